"""GG301 unused-parameter: a tower detached by mistake never receives gradients."""

import torch
from torch import nn

import gradguard


class TwoTowers(nn.Module):
    def __init__(self):
        super().__init__()
        self.text = nn.Linear(4, 2)
        self.image = nn.Linear(4, 2)

    def forward(self, x):
        return self.text(x) + self.image(x).detach()  # bug: detach() cuts the image tower off


torch.manual_seed(0)
model = TwoTowers()
optimizer = gradguard.guard(torch.optim.Adam(model.parameters()), model=model)

for step in range(25):
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    optimizer.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()
