"""Shared models and loops: small, seeded, real PyTorch."""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
import torch
import torch.nn.functional as F
from torch import nn

import gradguard
from gradguard import _process
from gradguard._config import OPTIONS
from gradguard._health import LATENESS

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent


class Net(nn.Module):
    """A two-part model, so findings can name a subset of parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


ALL = ("encoder.0.weight", "encoder.0.bias", "head.weight", "head.bias")
HEAD = ("head.weight", "head.bias")
ENCODER = ("encoder.0.weight", "encoder.0.bias")


def batches(n: int = 6, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` fixed random regression batches."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)) for _ in range(n)]


def loss_of(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean squared error of ``model`` on ``batch``."""
    x, y = batch
    return F.mse_loss(model(x), y)


def cleared_in_place(net: nn.Module, opt: torch.optim.Optimizer, steps: int = 3) -> None:
    """The model cleared in place between backward and step: a GG102 only a zero check
    on the device tells from a clip, so its finding waits for the device result."""
    for batch in batches(steps):
        opt.zero_grad()
        loss_of(net, batch).backward()
        net.zero_grad(set_to_none=False)
        opt.step()


@pytest.fixture
def net() -> Net:
    """A freshly seeded `Net`."""
    torch.manual_seed(0)
    return Net()


# How late device results arrive (gradguard._health.LATENESS): at once, as on
# the CPU; ready only after k more looks, as on a CUDA device running behind;
# or only when the guard closes.
DEVICE_RESULTS = {"eager": (0, False), "late-1": (1, False), "late-3": (3, False)}
DEVICE_RESULTS["at-close"] = (0, True)
# The modules whose tests run under each of GRADGUARD_DEVICE_RESULTS (comma-separated;
# CI: eager and at-close); every other module runs eager, unless
# GRADGUARD_DEVICE_RESULTS_EVERYWHERE=1 says every module.
DEFERRED_MODULES = {
    "test_amp",
    "test_api",
    "test_clearing_bugs",
    "test_correct_loops",
    "test_cost",
    "test_foreign",
    "test_health",
    "test_logs",
    "test_norms",
    "test_optimizers",
    "test_property",
    "test_real_patterns",
    "test_story",
    "test_tracking_changes",
    "test_training_unchanged",
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    everywhere = os.environ.get("GRADGUARD_DEVICE_RESULTS_EVERYWHERE") == "1"
    if everywhere or metafunc.module.__name__.rpartition(".")[2] in DEFERRED_MODULES:
        modes = os.environ.get("GRADGUARD_DEVICE_RESULTS", "eager,at-close").split(",")
        metafunc.parametrize("device_results", modes, indirect=True)


@pytest.fixture(autouse=True)
def device_results(request: pytest.FixtureRequest) -> Iterator[str]:
    """Device results arrive as ``request.param`` says (eager unless parametrized)."""
    mode = getattr(request, "param", "eager")
    LATENESS.steps, LATENESS.until_close = DEVICE_RESULTS[mode]
    try:
        yield mode
    finally:
        LATENESS.reset()


@pytest.fixture(autouse=True)
def _no_leftover_guards() -> Iterator[None]:
    """Fail a test that leaves hooks behind; start each test with structlog unconfigured."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()
    gc.collect()
    left = {name: n for name, n in _process.held().items() if n}
    _process.reset()  # the next test starts as at import, whatever this one left
    assert not left, f"a test left gradguard state behind: {left}"


def table(text: str) -> list[str]:
    """The summary table's lines in ``text``: from its header to the end of the last fix."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("code "))
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    return lines[start:end]


def codes(g: gradguard.Guard) -> list[str]:
    """The distinct finding codes a guard reported, in order."""
    return [f.code for f in g.findings]


# GRADGUARD, GRADGUARD_ACCUMULATION_STEPS...: what the shell running the suite
# sets must not reach the runs a test starts.
OPTION_VARS = tuple(option.env for option in OPTIONS)


def _unset_options(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OPTION_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def subprocess_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Make child processes import gradguard from this checkout, with no GRADGUARD set."""
    env = child_env()
    monkeypatch.setenv("PYTHONPATH", env["PYTHONPATH"])
    _unset_options(monkeypatch)
    monkeypatch.delenv("RANK", raising=False)
    return dict(os.environ)


def child_env() -> dict[str, str]:
    """An environment for a child process that imports gradguard from this checkout,
    with no GRADGUARD (or other option's variable) or RANK set (for runs started
    outside a test's own environment)."""
    env = {k: v for k, v in os.environ.items() if k not in (*OPTION_VARS, "RANK")}
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + path if path else "")
    return env


@pytest.fixture
def isolated_sys(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let an in-process run replace sys.argv, sys.path[0] and __main__, then restore them."""
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setitem(sys.modules, "__main__", sys.modules["__main__"])
    _unset_options(monkeypatch)


SOAK_DEFAULT = 2_000
SOAK_FULL = 20_000


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the tests marked ``cuda`` without a CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (benchmarks/gpu_check.py runs these)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Exempt what collection imported from garbage collection.

    The integration tests import Lightning, transformers and torch._dynamo:
    half a million objects that every ``gc.collect()`` (one per test, above)
    would walk again, 0.2 s each time.
    """
    gc.collect()
    gc.freeze()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak",
        action="store_true",
        help=f"run the soak test in full, {SOAK_FULL:,} steps (default {SOAK_DEFAULT:,}, "
        "or GRADGUARD_SOAK_STEPS)",
    )


@pytest.fixture
def soak_steps(request: pytest.FixtureRequest) -> int:
    """Soak test steps: the full count with ``--soak``, else GRADGUARD_SOAK_STEPS or 2,000."""
    if request.config.getoption("soak"):
        return SOAK_FULL
    return int(os.environ.get("GRADGUARD_SOAK_STEPS", SOAK_DEFAULT))
