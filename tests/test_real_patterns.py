"""Correct patterns from real programs: silent in strict mode and bit-identical to unguarded.

Each was a false alarm (or switched the guard off) on real code.
Each correct pattern has a buggy twin of the same shape that must still fire.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import structlog
import torch
import torch.nn.functional as F
from torch import nn

import gradguard
import gradguard.testing

Wrap = Callable[..., torch.optim.Optimizer]
"""What a scenario calls on each optimizer it builds: ``wrap(opt, model=None)``."""


class Guards:
    """Guards every optimizer a scenario builds, and remembers them to check and close."""

    def __init__(self, mode: str, **options: Any) -> None:
        self.mode = mode
        self.options = options
        self.guards: list[gradguard.Guard] = []
        self.fired: list[gradguard.Finding] = []

    def __call__(self, opt: torch.optim.Optimizer, model: nn.Module | None = None):
        gradguard.guard(opt, model=model, mode=self.mode, **self.options)
        g = gradguard.guard_of(opt)
        assert g is not None
        g._reporter.listeners.append(self.fired.append)
        self.guards.append(g)
        return opt

    def close(self) -> None:
        for g in self.guards:
            g.close()


def plain(opt: torch.optim.Optimizer, model: nn.Module | None = None) -> torch.optim.Optimizer:
    """The unguarded run: the optimizer as built."""
    return opt


def assert_silent_and_identical(scenario: Callable[[Wrap], list[torch.Tensor]], **options):
    """Run ``scenario`` unguarded, then guarded in strict mode: no finding, same weights."""
    expected = scenario(plain)
    guards = Guards("strict", **options)
    try:
        got = scenario(guards)
    finally:
        guards.close()
    assert [f.message for f in guards.fired] == []
    assert not any(g._failed for g in guards.guards), "the guard switched itself off"
    assert len(expected) == len(got)
    for a, b in zip(expected, got, strict=True):
        assert a.dtype == b.dtype
        assert torch.equal(a, b), "guarded training differs from unguarded"


def findings(scenario: Callable[[Wrap], Any], **options) -> list[tuple[str, int, tuple[str, ...]]]:
    """Run ``scenario`` guarded in log mode; every finding as ``(code, step, params)``."""
    guards = Guards("log", **options)
    with structlog.testing.capture_logs() as logs:
        try:
            scenario(guards)
        finally:
            guards.close()
    assert not [e for e in logs if e["event"] == "internal-error"]
    return [(f.code, f.step, f.params) for f in guards.fired]


def weights(*models: nn.Module) -> list[torch.Tensor]:
    """Every parameter of ``models``, detached copies."""
    return [p.detach().clone() for m in models for p in m.parameters()]


def data(n: int, *shape: int, seed: int = 0, dtype: torch.dtype = torch.float32):
    """``n`` fixed random tensors of ``shape``."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g).to(dtype) for _ in range(n)]


# -- 1. every dtype torch trains in ---------------------------------------------


class SequenceModel(nn.Module):
    """Two stacked LSTM cells predicting the next value of a wave, one step at a time."""

    def __init__(self) -> None:
        super().__init__()
        self.cell1 = nn.LSTMCell(1, 8)
        self.cell2 = nn.LSTMCell(8, 8)
        self.out = nn.Linear(8, 1)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        h1 = c1 = seq.new_zeros(seq.size(0), 8)
        h2 = c2 = seq.new_zeros(seq.size(0), 8)
        outputs = []
        for t in range(seq.size(1)):
            h1, c1 = self.cell1(seq[:, t : t + 1], (h1, c1))
            h2, c2 = self.cell2(h1, (h2, c2))
            outputs.append(self.out(h2))
        return torch.cat(outputs, dim=1)


def waves() -> tuple[torch.Tensor, torch.Tensor]:
    """Sine waves with random phases, as float64, and their next values."""
    t = torch.arange(21, dtype=torch.float64)
    phase = torch.arange(6, dtype=torch.float64)[:, None] * 0.7
    series = torch.sin(t / 3.0 + phase)
    return series[:, :-1], series[:, 1:]


def test_lbfgs_on_a_float64_sequence_model():
    """LBFGS with a closure on a float64 network (time-series prediction, PINNs)."""

    def scenario(wrap: Wrap) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = SequenceModel().double()
        opt = wrap(torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4), model)
        x, y = waves()
        for _ in range(3):

            def closure() -> torch.Tensor:
                opt.zero_grad()
                loss = F.mse_loss(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)
        return weights(model)

    assert_silent_and_identical(scenario)


DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
COMPLEX = [torch.complex64, torch.complex128]


def mlp(dtype: torch.dtype) -> nn.Module:
    """A small seeded MLP in ``dtype`` (a complex one has no activation in between)."""
    torch.manual_seed(0)
    if dtype.is_complex:
        return nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)).to(dtype)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).to(dtype)


def dtype_loop(
    wrap: Wrap, dtype: torch.dtype, *, zero_grad: bool = True, nan_at: int | None = None
) -> list[torch.Tensor]:
    """SGD on ``mlp(dtype)`` with clipping: the numeric checks and the zero check both run."""
    model = mlp(dtype)
    opt = wrap(torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9), model)
    for i, x in enumerate(data(6, 16, 4, dtype=dtype)):
        if zero_grad:
            opt.zero_grad()
        out = model(x if i != nan_at else x * math.nan)
        loss = out.abs().pow(2).mean() if dtype.is_complex else out.float().pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
    return weights(model)


COMPLEX_WARNING = "ignore:Complex modules are a new feature:UserWarning"


@pytest.mark.filterwarnings(COMPLEX_WARNING)
@pytest.mark.parametrize("dtype", DTYPES + COMPLEX, ids=str)
def test_every_dtype_is_checked_silently(dtype):
    """Every dtype torch trains in passes every check: no internal error, no finding."""
    assert_silent_and_identical(lambda wrap: dtype_loop(wrap, dtype))


NAMES = ("0.weight", "0.bias", "2.weight", "2.bias")


@pytest.mark.filterwarnings(COMPLEX_WARNING)
@pytest.mark.parametrize("dtype", DTYPES + COMPLEX, ids=str)
def test_every_dtype_still_reports_a_missing_zero_grad(dtype):
    """The buggy twin: without zero_grad every dtype is GG101 at step 2, on every parameter."""
    names = NAMES if not dtype.is_complex else ("0.weight", "0.bias", "1.weight", "1.bias")
    got = findings(lambda wrap: dtype_loop(wrap, dtype, zero_grad=False))
    assert got[0] == ("GG101", 2, names)


@pytest.mark.filterwarnings(COMPLEX_WARNING)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex128], ids=str)
def test_every_dtype_reports_nan_gradients(dtype):
    """GG201 on float64 and complex gradients, the case that used to disable the guard."""
    got = findings(lambda wrap: dtype_loop(wrap, dtype, nan_at=3))
    assert ("GG201", 4) in [(code, step) for code, step, _ in got]


def test_a_float64_norm_beyond_float32_range_is_not_called_non_finite():
    """A float64 gradient norm of 1e100 is finite: no GG201 (a float32 norm would be Inf)."""

    def scenario(wrap: Wrap) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Linear(3, 1, bias=False).double()
        opt = wrap(torch.optim.SGD(model.parameters(), lr=1e-150), model)
        for x in data(4, 5, 3, dtype=torch.float64):
            opt.zero_grad()
            (model(x).sum() * 1e100).backward()
            opt.step()
        return weights(model)

    assert_silent_and_identical(scenario)


def test_mixed_dtypes_name_the_right_parameters():
    """One optimizer over float64, float32 and bfloat16 layers: GG201 names the NaN one only."""

    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wide = nn.Linear(4, 4).double()
            self.mid = nn.Linear(4, 4)
            self.low = nn.Linear(4, 2).to(torch.bfloat16)

        def forward(self, x: torch.Tensor, poison: bool) -> torch.Tensor:
            h = self.mid(self.wide(x.double()).float())
            if poison:
                h = h.detach() * math.nan  # NaN reaches the last layer's gradients only
            return self.low(h.to(torch.bfloat16)).float()

    def scenario(wrap: Wrap, poison_at: int | None = None) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = Mixed()
        opt = wrap(torch.optim.SGD(model.parameters(), lr=0.01), model)
        for i, x in enumerate(data(4, 8, 4)):
            opt.zero_grad()
            model(x, poison=i == poison_at).pow(2).mean().backward()
            opt.step()
        return weights(model)

    assert_silent_and_identical(scenario)
    got = findings(lambda wrap: scenario(wrap, poison_at=2))
    assert got[0] == ("GG201", 3, ("low.weight", "low.bias"))


def test_parameters_on_the_meta_device():
    """A dry run on the meta device (shapes only) has no values to check: silent, guard on."""
    model = nn.Sequential(nn.Linear(4, 8, device="meta"), nn.ReLU(), nn.Linear(8, 2, device="meta"))
    opt = torch.optim.AdamW(model.parameters())
    with gradguard.guarding(opt, model=model, mode="strict") as g:
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(4, 4, device="meta")).sum().backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        assert not g.closed
    assert g.findings == []
