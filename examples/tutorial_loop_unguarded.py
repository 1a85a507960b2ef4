"""The tutorial loop as users write it: backward, zero_grad, step. No gradguard in sight.

`gradguard run examples/tutorial_loop_unguarded.py` reports the same GG102 as
tutorial_loop.py's guard line, without a change to this file.
"""

import torch
import torch.nn as nn


class LinearRegression(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(1, 1)

    def forward(self, x):
        return self.linear(x)


torch.manual_seed(0)
x = torch.randn(10, 1)
y = 3 * x + 2 + torch.randn(10, 1)

model = LinearRegression()
criterion = nn.MSELoss()
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

for epoch in range(100):
    outputs = model(x)
    loss = criterion(outputs, y)
    loss.backward()
    optimizer.zero_grad()
    optimizer.step()
    if (epoch + 1) % 10 == 0:
        print(f"Epoch [{epoch + 1}/100], Loss: {loss.item():.4f}")
