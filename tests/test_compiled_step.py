"""torch.compile(optimizer.step): no graph break from gradguard, every step still judged.

Graph breaks are counted on the same model with and without a guard; they are
dynamo's decision, made before any backend compiles a graph, so they are
counted with ``backend="eager"``. The findings and the bit-identical run use
inductor (the default backend), or AOT autograd without a C++ compiler.

(Named apart from ``integrations/test_compile.py``: two test modules of one
basename cannot be collected in one run.)
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import nullcontext

import pytest
import torch
import torch._dynamo
from conftest import ALL, Net, batches, loss_of
from torch._dynamo.utils import counters

import gradguard

pytestmark = pytest.mark.filterwarnings(
    # Raised inside torch as inductor starts, with or without gradguard.
    "ignore:.*torch.jit.script_method. is deprecated"
)

BACKEND = "inductor" if shutil.which("g++") or shutil.which("c++") else "aot_eager"
OPTIMIZERS: dict[str, Callable[[Net], torch.optim.Optimizer]] = {
    "adamw": lambda net: torch.optim.AdamW(net.parameters(), lr=1e-2),  # foreach
    "sgd": lambda net: torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
}
Step = Callable[[], object]


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    """Each test compiles from scratch (no recompile limit carried over) and counts its own."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    counters.clear()


def breaks() -> int:
    """Graph breaks dynamo counted since the test began."""
    return sum(counters["graph_break"].values())


def loop(net: Net, step: Step, opt: torch.optim.Optimizer, bug: str | None, steps: int) -> None:
    """A training loop calling ``step``; ``bug`` forgets zero_grad or clears before the step."""
    for i, b in enumerate(batches(steps)):
        if bug is None or (bug == "missing_zero_grad" and i == 0):
            opt.zero_grad()
        loss_of(net, b).backward()
        if bug == "clear_before_step":
            opt.zero_grad()  # the tutorial order: backward, zero_grad, step
        step()


def train(opt_name: str, *, guarded: bool, backend: str, steps: int = 4) -> list[torch.Tensor]:
    """Train a seeded Net with a compiled step, guarded or not; its final parameters."""
    torch.manual_seed(0)
    net = Net()
    opt = OPTIMIZERS[opt_name](net)
    with gradguard.guarding(opt, model=net, mode="strict") if guarded else nullcontext():
        loop(net, torch.compile(opt.step, backend=backend), opt, None, steps)
    return [p.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_a_guard_adds_no_graph_break_to_a_compiled_step(opt_name):
    """torch.compile(opt.step) breaks no more often guarded than unguarded, into as many graphs."""
    train(opt_name, guarded=False, backend="eager")
    plain = (breaks(), counters["stats"]["unique_graphs"])
    torch._dynamo.reset()
    counters.clear()
    train(opt_name, guarded=True, backend="eager")
    guarded = (breaks(), counters["stats"]["unique_graphs"])
    # Fewer, not equal: guarded, torch's hook-calling wrapper runs as plain Python,
    # so the break it has unguarded (at its call of the update) is never taken.
    assert guarded[0] <= plain[0]
    assert guarded[1] == plain[1] > 0  # the optimizer's own step is still compiled


CASES = [(None, []), ("missing_zero_grad", [("GG101", 2)]), ("clear_before_step", [("GG102", 1)])]


@pytest.mark.parametrize(("bug", "expected"), CASES, ids=["correct", "gg101", "gg102"])
def test_a_compiled_step_is_judged_at_every_call_as_an_eager_one(bug, expected):
    """Each bug is reported with its names, as often as an eager step reports it."""
    reported = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        net = Net()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
        with gradguard.guarding(opt, model=net, mode="log") as g:
            step = torch.compile(opt.step, backend=BACKEND) if compiled else opt.step
            loop(net, step, opt, bug, steps=4)
        reported[compiled] = [(f.code, f.step, f.params, n) for f, n in g.counts.items()]
    assert [(code, step) for code, step, _, _ in reported[True]] == expected
    assert all(params == ALL for _, _, params, _ in reported[True])
    assert reported[True] == reported[False]  # GG101 is counted at steps 2, 3 and 4


STRICT = [
    ("missing_zero_grad", gradguard.StaleGradientError, 2),
    ("clear_before_step", gradguard.ClearedBeforeStepError, 1),
]


@pytest.mark.parametrize(("bug", "error", "at"), STRICT, ids=["gg101", "gg102"])
def test_strict_mode_raises_before_the_compiled_step_applies(bug, error, at):
    """The step that would apply the bug raises, and the compiled update does not run."""
    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    step = torch.compile(opt.step, backend=BACKEND)
    before: list[torch.Tensor] = []

    def snapshot_then_step() -> None:
        before[:] = [p.detach().clone() for p in net.parameters()]
        step()

    with gradguard.guarding(opt, model=net, mode="strict"):
        with pytest.raises(error) as raised:
            loop(net, snapshot_then_step, opt, bug, steps=4)
        assert raised.value.finding is not None
        assert (raised.value.finding.step, raised.value.finding.params) == (at, ALL)
        assert all(torch.equal(a, p) for a, p in zip(before, net.parameters(), strict=True))


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_a_correct_loop_with_a_compiled_step_is_silent_and_bit_identical_in_strict_mode(opt_name):
    """Strict mode on a correct loop: no finding, and the same parameters as unguarded."""
    plain = train(opt_name, guarded=False, backend=BACKEND, steps=5)
    guarded = train(opt_name, guarded=True, backend=BACKEND, steps=5)
    assert all(torch.equal(a, b) for a, b in zip(plain, guarded, strict=True))


def test_install_judges_a_compiled_step_with_no_graph_break():
    """Under install(), a compiled step's optimizer is judged, named after the model, not
    after the graphs torch.compile builds from it."""

    def run(session: bool) -> tuple[int, list[tuple[str, int, tuple[str, ...]]]]:
        torch._dynamo.reset()
        counters.clear()
        if session:
            gradguard.install(mode="log")
        try:
            torch.manual_seed(0)
            net = Net()
            opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
            loop(net, torch.compile(opt.step, backend="eager"), opt, "missing_zero_grad", 4)
            g = gradguard.guard_of(opt)
            return breaks(), [(f.code, f.step, f.params) for f in g.findings] if g else []
        finally:
            if session:
                gradguard.uninstall()

    plain, _ = run(session=False)
    guarded, found = run(session=True)
    assert guarded <= plain
    assert found == [("GG101", 2, ALL)]
