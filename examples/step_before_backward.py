"""GG103 step-without-backward: step() runs before backward() has produced anything."""

import torch
from torch import nn

import gradguard

torch.manual_seed(0)
model = nn.Linear(8, 2)
optimizer = gradguard.guard(torch.optim.SGD(model.parameters(), lr=0.1), model=model)

for step in range(5):
    x, y = torch.randn(16, 8), torch.randn(16, 2)
    optimizer.zero_grad()
    optimizer.step()  # bug: steps first (GG103), then the next zero_grad discards (GG102)
    nn.functional.mse_loss(model(x), y).backward()
