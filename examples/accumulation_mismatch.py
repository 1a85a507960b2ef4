"""GG104 accumulation-mismatch: model.zero_grad() inside the accumulation window."""

import torch
from torch import nn

import gradguard

ACCUMULATION = 4
torch.manual_seed(0)
model = nn.Linear(8, 2)
optimizer = gradguard.guard(
    torch.optim.AdamW(model.parameters(), lr=1e-3),
    model=model,
    accumulation_steps=ACCUMULATION,
)

for i in range(16):
    x, y = torch.randn(8, 8), torch.randn(8, 2)
    model.zero_grad()  # bug: wipes the micro-batches accumulated so far
    loss = nn.functional.mse_loss(model(x), y) / ACCUMULATION
    loss.backward()
    if (i + 1) % ACCUMULATION == 0:
        optimizer.step()
        optimizer.zero_grad()
