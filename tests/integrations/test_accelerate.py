"""Hugging Face Accelerate: accumulate() windows, AcceleratedOptimizer, and the alpaca_farm bug."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from support import require
from torch import nn

import gradguard

accelerate = require("accelerate")

ACCUM = 2
PARAMS = ("encoder.weight", "encoder.bias", "head.weight", "head.bias")


class Net(nn.Module):
    """Two layers, so findings name real parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.encoder(x)))


@pytest.fixture(autouse=True)
def _fresh_accelerate_state() -> Iterator[None]:
    """Accelerate keeps process-wide singletons; each test gets its own."""
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def prepared(accum: int = ACCUM):
    """A CPU Accelerator with gradient accumulation, and its prepared model, optimizer, data."""
    torch.manual_seed(0)
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=accum)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.utils.data.TensorDataset(torch.randn(48, 4), torch.randn(48, 1))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    return accelerator, model, opt, loader


def train(accelerator, model, opt, loader, *, model_zero_grad_inside: bool = False) -> None:
    """The loop from Accelerate's gradient accumulation guide."""
    for x, y in loader:
        with accelerator.accumulate(model):
            if model_zero_grad_inside:
                model.zero_grad()  # alpaca_farm #57: the model, not the wrapped optimizer
            loss = nn.functional.mse_loss(model(x), y)
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad()


def test_guard_takes_the_accelerated_optimizer_and_returns_it():
    """guard(AcceleratedOptimizer) watches the optimizer it wraps and returns the wrapper."""
    _, model, opt, _ = prepared()
    assert type(opt).__name__ == "AcceleratedOptimizer"
    assert gradguard.guard(opt, model=model, mode="strict") is opt
    g = gradguard.guard_of(opt)
    assert g is not None
    assert g is gradguard.guard_of(opt.optimizer)
    assert g.options.accumulation_steps == ACCUM  # taken from the Accelerator
    gradguard.unguard(opt)
    assert gradguard.guard_of(opt.optimizer) is None


def test_accumulate_windows_are_silent_in_strict_mode():
    """accumulate() with no-op step/zero_grad inside each window: no finding."""
    accelerator, model, opt, loader = prepared()
    with gradguard.guarding(opt, model=model, mode="strict") as g:
        train(accelerator, model, opt, loader)
    assert g.findings == []
    assert g._judge.step == 48 // 4 // ACCUM


def test_accumulate_windows_are_silent_under_install():
    """Process-wide guarding (what gradguard run does) finds the inner optimizer: silent."""
    accelerator, model, opt, loader = prepared()
    gradguard.install(mode="strict")
    try:
        train(accelerator, model, opt, loader)
        g = gradguard.guard_of(opt)
        assert g is not None
        assert g.options.accumulation_steps == ACCUM
    finally:
        rows = gradguard.uninstall()
    assert rows == []


def test_model_zero_grad_inside_accumulate_is_reported_at_the_first_step():
    """alpaca_farm #57: model.zero_grad() inside accumulate() keeps only the last micro-batch."""
    accelerator, model, opt, loader = prepared()
    with gradguard.guarding(opt, model=model, mode="log") as g:
        train(accelerator, model, opt, loader, model_zero_grad_inside=True)
    assert [f.code for f in g.findings] == ["GG104"]
    (finding,) = g.findings
    assert finding.step == 1
    assert finding.params == PARAMS
    assert "threw micro-batches away" in finding.message
    assert finding.location.endswith(f"test_accelerate.py:{train.__code__.co_firstlineno + 8}")


def test_model_zero_grad_inside_accumulate_strict_raises():
    """The same bug in strict mode raises AccumulationMismatchError at the first real step."""
    accelerator, model, opt, loader = prepared()
    with (
        gradguard.guarding(opt, model=model, mode="strict"),
        pytest.raises(gradguard.AccumulationMismatchError),
    ):
        train(accelerator, model, opt, loader, model_zero_grad_inside=True)


def test_without_accumulation_the_plain_loop_is_silent():
    """gradient_accumulation_steps=1: every step is real, nothing is declared, nothing found."""
    accelerator, model, opt, loader = prepared(accum=1)
    with gradguard.guarding(opt, model=model, mode="strict") as g:
        train(accelerator, model, opt, loader)
    assert g.options.accumulation_steps is None
    assert g.findings == []
