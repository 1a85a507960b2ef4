"""GG105 discarded-gradients: zero_grad() before every micro-batch defeats accumulation."""

import torch
from torch import nn

import gradguard

torch.manual_seed(0)
model = nn.Linear(8, 2)
optimizer = gradguard.guard(torch.optim.SGD(model.parameters(), lr=0.1), model=model)

for i in range(16):
    x, y = torch.randn(8, 8), torch.randn(8, 2)
    optimizer.zero_grad()  # bug: should run only after each step
    (nn.functional.mse_loss(model(x), y) / 4).backward()
    if (i + 1) % 4 == 0:
        optimizer.step()
