"""GG101 stale-gradient: a loop that never clears, so every step re-applies old gradients."""

import torch
from torch import nn

import gradguard

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
optimizer = gradguard.guard(torch.optim.AdamW(model.parameters(), lr=1e-3), model=model)

for step in range(20):
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()  # bug: no optimizer.zero_grad() anywhere in the loop
    optimizer.step()
