"""GG302 unoptimized-parameter: a head added after the optimizer was built is never updated."""

import torch
from torch import nn

import gradguard

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
optimizer = gradguard.guard(torch.optim.Adam(model.parameters()), model=model)
model.append(nn.Linear(8, 2))  # bug: the optimizer was built before the head existed

for step in range(5):
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    optimizer.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()
