"""GG303 eval-mode-step: training resumes after validation without model.train()."""

import torch
from torch import nn

import gradguard

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2))
optimizer = gradguard.guard(torch.optim.SGD(model.parameters(), lr=0.1), model=model)

for epoch in range(2):
    for step in range(3):
        x, y = torch.randn(8, 4), torch.randn(8, 2)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    model.eval()  # validation; bug: no model.train() afterwards
    with torch.no_grad():
        model(torch.randn(8, 4))
