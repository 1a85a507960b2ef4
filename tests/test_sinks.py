"""The live feed of findings: `gradguard.add_sink` and `gradguard.testing.capture_findings`."""

from __future__ import annotations

import pytest
import torch
from conftest import ALL, Net, batches, cleared_in_place, loss_of
from loops import step_lineno, train

import gradguard
from gradguard._health import LATENESS
from gradguard.testing import capture_findings, record


def _tutorial_bug(net: Net, opt: torch.optim.Optimizer, steps: int = 3) -> None:
    """backward, zero_grad, step: GG102 at every step."""
    for batch in batches(steps):
        loss_of(net, batch).backward()
        opt.zero_grad()
        opt.step()


def _no_clear(net: Net, opt: torch.optim.Optimizer, steps: int = 3) -> None:
    """No zero_grad at all: each step applies stale gradients from the second on (GG101)."""
    for batch in batches(steps):
        loss_of(net, batch).backward()
        opt.step()


def test_capture_findings_sees_every_guard_and_every_step() -> None:
    """Two guards' findings, each step's occurrence, as `record` lists them for one guard."""
    nets = [Net(), Net()]
    opts = [
        gradguard.guard(torch.optim.SGD(n.parameters(), lr=0.1), model=n, mode="log") for n in nets
    ]
    first = gradguard.guard_of(opts[0])
    assert first is not None
    with capture_findings() as found, record(first) as recorded:
        for net, opt in zip(nets, opts, strict=True):
            _tutorial_bug(net, opt)
    assert [(f.code, f.optimizer, f.step) for f in found] == [
        ("GG102", name, step) for name in ("SGD#0", "SGD#1") for step in (1, 2, 3)
    ]
    assert found[:3] == recorded
    for opt in opts:
        gradguard.unguard(opt)


def test_capture_findings_sees_the_guards_install_attaches() -> None:
    """The optimizers `install()` discovers report to it too, where the step is."""
    with capture_findings() as found:
        gradguard.install(mode="log")
        try:
            train(bug=True, steps=3)
        finally:
            gradguard.uninstall()
    assert [f.code for f in found] == ["GG102"] * 3
    assert all(f.location.endswith(f"loops.py:{step_lineno()}") for f in found)


def test_nothing_reaches_it_after_the_block(net: Net) -> None:
    """Findings after the block ends are not added to its list."""
    opt = gradguard.guard(torch.optim.SGD(net.parameters(), lr=0.1), model=net, mode="log")
    with capture_findings() as found:
        _tutorial_bug(net, opt, steps=1)
    _tutorial_bug(net, opt, steps=2)
    gradguard.unguard(opt)
    assert [f.step for f in found] == [1]


def test_it_judges_the_device_results_pending_at_its_end(net: Net) -> None:
    """Results the device still holds when the block ends are judged then; the guard lives on."""
    LATENESS.until_close = True  # every result arrives only when asked for, as on a slow GPU
    opt = gradguard.guard(torch.optim.SGD(net.parameters(), lr=0.1), model=net, mode="log")
    with capture_findings() as found:
        cleared_in_place(net, opt)
        assert found == []
    # Step 1 is silent: zeros there could be nan_to_num_ of NaNs.
    assert [(f.code, f.step, f.params) for f in found] == [("GG102", 2, ALL), ("GG102", 3, ALL)]
    assert gradguard.guard_of(opt) is not None
    gradguard.unguard(opt)


def test_a_strict_findings_error_is_in_its_list(net: Net) -> None:
    """The finding a strict guard raises for reached the list before it was raised."""
    opt = gradguard.guard(torch.optim.SGD(net.parameters(), lr=0.1), model=net, mode="strict")
    with capture_findings() as found, pytest.raises(gradguard.ClearedBeforeStepError) as raised:
        _tutorial_bug(net, opt)
    gradguard.unguard(opt)
    assert found == [raised.value.finding]


def test_a_sink_gets_each_occurrence_and_whether_it_is_new(net: Net) -> None:
    """``first`` is true where the finding is warned; repeats come with their own step."""
    seen: list[tuple[int, bool]] = []
    handle = gradguard.add_sink(lambda finding, first: seen.append((finding.step, first)))
    opt = gradguard.guard(torch.optim.SGD(net.parameters(), lr=0.1), model=net, mode="log")
    _tutorial_bug(net, opt)
    handle.remove()
    handle.remove()  # idempotent
    _tutorial_bug(net, opt, steps=1)
    gradguard.unguard(opt)
    assert seen == [(1, True), (2, False), (3, False)]


def test_a_sink_handle_removes_it_at_the_end_of_a_with_block(net: Net) -> None:
    """``with gradguard.add_sink(sink):`` stops the sink when the block ends."""
    seen: list[int] = []
    opt = gradguard.guard(torch.optim.SGD(net.parameters(), lr=0.1), model=net, mode="log")
    with gradguard.add_sink(lambda finding, first: seen.append(finding.step)) as handle:
        _tutorial_bug(net, opt, steps=1)
    assert isinstance(handle, gradguard.SinkHandle)
    _tutorial_bug(net, opt, steps=1)
    handle.remove()  # already removed: nothing happens
    gradguard.unguard(opt)
    assert seen == [1]


def test_a_sink_that_raises_never_breaks_training_in_warn_mode(
    net: Net, capsys: pytest.CaptureFixture[str]
) -> None:
    """The sink is removed and said once; training runs as unguarded, the warning shows,
    the other sinks get every finding."""
    calls: list[int] = []

    def broken(finding: gradguard.Finding, first: bool) -> None:
        calls.append(finding.step)
        raise RuntimeError("the sink broke")

    reference = Net()
    reference.load_state_dict(net.state_dict())
    _no_clear(reference, torch.optim.SGD(reference.parameters(), lr=0.1))
    handle = gradguard.add_sink(broken)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with (
        capture_findings() as found,
        gradguard.guarding(opt, model=net),
        pytest.warns(gradguard.StaleGradientWarning) as shown,
    ):
        _no_clear(net, opt)
    handle.remove()
    assert calls == [2]  # removed at its first failure
    assert [(f.code, f.step) for f in found] == [("GG101", 2), ("GG101", 3)]
    assert len(shown) == 1
    assert all(
        torch.equal(a, b) for a, b in zip(net.parameters(), reference.parameters(), strict=True)
    )
    err = capsys.readouterr().err
    assert err.count("sink-error") == 1
    assert "RuntimeError: the sink broke" in err


def test_add_sink_refuses_what_it_cannot_call() -> None:
    """A sink that is not callable is refused where it is passed, saying what is needed."""
    with pytest.raises(TypeError, match=r"add_sink\(\) needs a callable taking \(finding, first\)"):
        gradguard.add_sink("print")  # type: ignore[arg-type]
