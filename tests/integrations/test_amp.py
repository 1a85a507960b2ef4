"""Automatic mixed precision: torch.autocast and torch.amp.GradScaler, skipped steps included.

On this CPU: bfloat16 and float16 autocast with the CPU GradScaler. A float16
scaler that starts with a large scale skips its first steps, as on a GPU.
"""

from __future__ import annotations

import pytest
import structlog
import torch
from torch import nn

import gradguard

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "adam-foreach": lambda p: torch.optim.Adam(p, lr=1e-3, foreach=True),
    "adamw-fused": lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True),
}


def model() -> nn.Module:
    """A small seeded MLP."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``i``-th fixed batch."""
    g = torch.Generator().manual_seed(i)
    return torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)


def train(
    net: nn.Module,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    *,
    dtype: torch.dtype = torch.bfloat16,
    steps: int = 10,
    accumulate: int = 1,
    clip: bool = True,
    inf_at: tuple[int, ...] = (),
    zero_grad: bool = True,
) -> None:
    """The AMP recipe: autocast forward, scaled backward, unscale_ and clip, scaler step/update."""
    for step in range(steps):
        if zero_grad:
            opt.zero_grad()
        for k in range(accumulate):
            x, y = batch(step * accumulate + k)
            with torch.autocast("cpu", dtype=dtype):
                loss = nn.functional.mse_loss(net(x).float(), y) / accumulate
            if step in inf_at:
                loss = loss * float("inf")
            scaler.scale(loss).backward()
        if clip:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_autocast_with_unscale_and_clipping_is_silent(name, dtype):
    """unscale_, clip_grad_norm_ and scaler.step on every optimizer kind: silent in strict mode."""
    net = model()
    opt = OPTIMIZERS[name](net.parameters())
    with gradguard.guarding(opt, model=net, mode="strict") as g:
        train(net, opt, torch.amp.GradScaler("cpu"), dtype=dtype)
    assert g.findings == []


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fp16_warm_up_skips_are_neither_gg102_gg103_nor_gg201(name):
    """A float16 scaler starting at 2**24 skips its first steps: silent, and the scale settles."""
    net = model()
    opt = OPTIMIZERS[name](net.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)
    with (
        structlog.testing.capture_logs() as logs,
        gradguard.guarding(opt, model=net, mode="strict") as g,
    ):
        train(net, opt, scaler, dtype=torch.float16, steps=12, clip=False)
    assert g.findings == []
    assert scaler.get_scale() < 2.0**24
    skipped = [e for e in logs if e["event"] == "skipped-step"]
    if name.endswith("fused"):
        # Fused optimizers take the step call and skip inside the kernel: an info event each.
        assert len(skipped) >= 3
    else:
        # Others are never called on a skipped step: nothing to see.
        assert skipped == []


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_skips_inside_declared_accumulation_are_silent(name):
    """A window the scaler skips is cleared whole by the next zero_grad: not GG104."""
    net = model()
    opt = OPTIMIZERS[name](net.parameters())
    with gradguard.guarding(opt, model=net, mode="strict", accumulation_steps=3) as g:
        train(net, opt, torch.amp.GradScaler("cpu"), accumulate=3, inf_at=(2, 5, 6))
    assert g.findings == []


def test_missing_zero_grad_under_amp_is_still_stale():
    """A GradScaler does not hide the missing zero_grad: GG101 at step 2."""
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    with gradguard.guarding(opt, model=net, mode="log") as g:
        train(net, opt, torch.amp.GradScaler("cpu"), steps=4, zero_grad=False)
    assert [(f.code, f.step) for f in g.findings] == [("GG101", 2)]


def test_non_finite_gradient_without_a_scaler_is_gg201_under_autocast():
    """Under autocast without a scaler nothing skips the step: an inf gradient is GG201."""
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    with gradguard.guarding(opt, model=net, mode="log") as g:
        for i in range(3):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.functional.mse_loss(net(batch(i)[0]).float(), batch(i)[1])
            (loss * float("inf") if i == 1 else loss).backward()
            opt.step()
    assert [(f.code, f.step) for f in g.findings] == [("GG201", 2)]
