"""torch.compile (inductor on the CPU) and compiled autograd: every finding, no graph break."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator

import pytest
import torch
import torch._dynamo
import torch._dynamo.compiled_autograd
from torch import nn
from torch._dynamo.utils import counters

import gradguard

pytestmark = [
    pytest.mark.skipif(
        shutil.which("g++") is None and shutil.which("c++") is None,
        reason="inductor on the CPU needs a C++ compiler",
    ),
    # Raised inside torch (inductor's start-up, compiled autograd faking the
    # loss tensor), with or without gradguard.
    pytest.mark.filterwarnings("ignore:.*torch.jit.script_method. is deprecated"),
    pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf"),
]

PARAMS = ("0.weight", "0.bias", "2.weight", "2.bias")


@pytest.fixture(scope="module")
def compiled() -> Iterator[tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]]:
    """A small model and its inductor-compiled forward, compiled once for the module."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    yield net, torch.compile(net, backend="inductor")
    torch._dynamo.reset()
    counters.clear()  # later tests run as a process that compiled nothing


def batch(i: int) -> torch.Tensor:
    """The ``i``-th fixed input."""
    return torch.randn(8, 4, generator=torch.Generator().manual_seed(i))


def loop(opt, forward, *, bug: str | None, backward=None, steps: int = 4) -> None:
    """A training loop over a compiled forward, with an optional bug."""
    for i in range(steps):
        if bug != "missing_zero_grad":
            opt.zero_grad()
        loss = forward(batch(i)).pow(2).mean()
        if backward is None:
            loss.backward()
        else:
            backward(loss)
        if bug == "clear_before_step":
            opt.zero_grad()
        opt.step()


CASES = [(None, []), ("missing_zero_grad", [("GG101", 2)]), ("clear_before_step", [("GG102", 1)])]


@pytest.mark.parametrize(("bug", "expected"), CASES, ids=["correct", "gg101", "gg102"])
def test_compiled_model_keeps_every_finding(compiled, bug, expected):
    """torch.compile(model): the correct loop is silent, each bug is reported with its names."""
    net, forward = compiled
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    with gradguard.guarding(opt, model=net, mode="log") as g:
        loop(opt, forward, bug=bug)
    assert [(f.code, f.step) for f in g.findings] == expected
    assert all(f.params == PARAMS for f in g.findings)


@pytest.mark.parametrize(("bug", "expected"), CASES, ids=["correct", "gg101", "gg102"])
def test_compiled_autograd_keeps_every_finding(compiled, bug, expected):
    """A backward compiled by compiled autograd with inductor: same findings as eager."""
    net, forward = compiled
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    backward_compiler = torch.compile(backend="inductor")

    def backward(loss: torch.Tensor) -> None:
        with torch._dynamo.compiled_autograd._enable(backward_compiler):
            loss.backward()

    with gradguard.guarding(opt, model=net, mode="log") as g:
        loop(opt, forward, bug=bug, backward=backward)
    assert [(f.code, f.step) for f in g.findings] == expected


def test_gradguard_adds_no_graph_break_to_the_compiled_forward(compiled):
    """With a guard attached (hooks on every parameter), the forward compiles to one graph."""
    net, _ = compiled
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    with gradguard.guarding(opt, model=net, mode="strict"):
        explained = torch._dynamo.explain(net)(batch(0))
    assert explained.graph_break_count == 0
    assert explained.graph_count == 1


@pytest.mark.xfail(
    strict=True,
    reason="known: under compiled autograd the post-accumulate hook's view check "
    "(Tensor._is_view) adds graph breaks to a compiled train step",
)
def test_a_compiled_train_step_breaks_only_where_dynamo_does_without_gradguard():
    """compiled_autograd=True and a compiled forward+backward: the same graph breaks either way."""

    def run(guarded: bool) -> tuple[dict[str, int], list[str]]:
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        opt = torch.optim.SGD(net.parameters(), lr=0.01)

        @torch.compile(backend="inductor")
        def forward_backward(x: torch.Tensor) -> torch.Tensor:
            loss = net(x).pow(2).mean()
            loss.backward()
            return loss

        found: list[str] = []
        with torch._dynamo.config.patch(compiled_autograd=True):
            if guarded:
                with gradguard.guarding(opt, model=net, mode="log") as g:
                    for i in range(3):
                        forward_backward(batch(i))  # zero_grad forgotten: GG101
                        opt.step()
                found = [f.code for f in g.findings]
            else:
                for i in range(3):
                    forward_backward(batch(i))
                    opt.step()
        return dict(counters["graph_break"]), found

    without, _ = run(guarded=False)
    with_guard, found = run(guarded=True)
    torch._dynamo.reset()
    counters.clear()
    assert with_guard == without
    assert found == ["GG101"]


def test_install_with_a_compiled_model_changes_nothing():
    """Under install(), a torch.compile(module) model trains bit-identically, with no warning
    (gradguard's registration hooks run while modules are built, never in a forward)."""

    def train(guarded: bool) -> list[torch.Tensor]:
        torch._dynamo.reset()
        if guarded:
            gradguard.install(mode="strict")
        try:
            torch.manual_seed(0)
            net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
            forward = torch.compile(net, backend="inductor")
            opt = torch.optim.SGD(net.parameters(), lr=0.01)
            loop(opt, forward, bug=None)
        finally:
            assert gradguard.uninstall() == []
        return [p.detach().clone() for p in net.parameters()]

    plain = train(guarded=False)
    guarded = train(guarded=True)
    torch._dynamo.reset()
    counters.clear()
    assert all(torch.equal(a, b) for a, b in zip(plain, guarded, strict=True))
