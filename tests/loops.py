"""Small real training loops shared by the tests: the tutorial bug and its correct twin."""

from __future__ import annotations

import torch
from torch import nn


def train(*, bug: bool, steps: int = 3) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Train a tiny model; with ``bug`` it clears gradients between backward and step (GG102)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 2)
    for _ in range(steps):
        if not bug:
            opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        if bug:
            opt.zero_grad()
        opt.step()
    return model, opt


STEP_LINE = "        opt.step()"
"""The line every finding of `train` points at."""


def step_lineno() -> int:
    """The line number of `STEP_LINE` in this file."""
    with open(__file__, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f].index(STEP_LINE) + 1


LOOP_SCRIPT = """\
import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
x = torch.randn(8, 2)
for _ in range(3):
    {before}
    loss = model(x).pow(2).mean()
    loss.backward()
    {after}
    opt.step()
print("trained")
"""
"""A script version of `train`: fill ``before``/``after`` with ``opt.zero_grad()`` or ``pass``."""

BUGGY_SCRIPT = LOOP_SCRIPT.format(before="pass", after="opt.zero_grad()")
CORRECT_SCRIPT = LOOP_SCRIPT.format(before="opt.zero_grad()", after="pass")
