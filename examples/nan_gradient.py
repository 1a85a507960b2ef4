"""GG201 non-finite-gradient: one corrupt (NaN) sample turns every gradient into NaN."""

import torch
from torch import nn

import gradguard

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
optimizer = gradguard.guard(torch.optim.SGD(model.parameters(), lr=0.01), model=model)

for step in range(5):
    x = torch.randn(16, 4)
    if step == 3:
        x[0] = float("nan")  # one corrupt sample in the batch
    optimizer.zero_grad()
    loss = model(x).pow(2).mean()
    loss.backward()
    optimizer.step()
