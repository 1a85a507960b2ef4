"""GG202 exploding-gradient: one batch with outlier inputs makes the gradient norm jump."""

import torch
from torch import nn

import gradguard

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 1))
optimizer = gradguard.guard(torch.optim.SGD(model.parameters(), lr=1e-3), model=model)

for step in range(40):
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    if step == 30:
        y = y * 1e4  # mislabelled targets: no clipping, so the step takes it all
    optimizer.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()
