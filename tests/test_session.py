"""gradguard.install() / uninstall(): one call guards every optimizer in the process."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from loops import BUGGY_SCRIPT, step_lineno, train

import gradguard


@pytest.fixture(autouse=True)
def _uninstall() -> Iterator[None]:
    yield
    gradguard.uninstall()


def test_install_reports_an_optimizer_the_code_never_guarded(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A loop with no gradguard line gets its GG102 once install() ran, counted in the summary."""
    gradguard.install(mode="log")
    train(bug=True, steps=3)
    rows = gradguard.uninstall()
    # The first step, unwatched before, is GG102 as well once step 2 shows the clear.
    assert [(r.code, r.count, r.first_step) for r in rows] == [("GG102", 3, 1)]
    assert rows[0].params == ("0.weight", "0.bias", "2.weight", "2.bias")
    out, err = capsys.readouterr()
    assert out == ""
    row = next(line for line in err.splitlines() if line.startswith("GG102"))
    assert row.split()[:4] == ["GG102", "cleared-before-step", "3", "1"]
    assert f"loops.py:{step_lineno()}" in row


def test_strict_raises_from_the_first_judged_step() -> None:
    """In strict mode the finding raises from optimizer.step(); the discovery step, which
    found no gradient, is told apart at step 2 and raised there as the clear it was."""
    gradguard.install(mode="strict")
    with pytest.raises(gradguard.ClearedBeforeStepError) as info:
        train(bug=True)
    finding = info.value.finding
    assert finding is not None
    assert finding.step == 1
    assert finding.location.endswith(f"loops.py:{step_lineno()}")


def test_correct_loop_stays_silent(capsys: pytest.CaptureFixture[str]) -> None:
    """A correct loop reports nothing, including at the step where the optimizer is discovered."""
    gradguard.install(mode="strict")
    train(bug=False, steps=4)
    assert gradguard.uninstall() == []
    assert capsys.readouterr().err == ""


def test_guard_without_mode_follows_install() -> None:
    """guard() with no mode= takes install()'s mode; an explicit mode= in the code wins."""
    gradguard.install(mode="strict", ignore=["GG103"])
    params = [torch.nn.Parameter(torch.ones(2))]
    implicit = gradguard.guard(torch.optim.SGD(params, lr=0.1))
    explicit = gradguard.guard(torch.optim.SGD(params, lr=0.1), mode="log")
    implicit_guard, explicit_guard = gradguard.guard_of(implicit), gradguard.guard_of(explicit)
    assert implicit_guard is not None
    assert explicit_guard is not None
    assert (implicit_guard.mode, explicit_guard.mode) == ("strict", "log")


def test_uninstall_removes_the_guards_install_made() -> None:
    """After uninstall() the optimizers install() guarded are plain again and bugs pass silently."""
    gradguard.install(mode="strict")
    _, opt = train(bug=False)
    assert gradguard.guard_of(opt) is not None
    gradguard.uninstall()
    assert gradguard.guard_of(opt) is None
    train(bug=True)


def test_second_install_replaces_the_first(capsys: pytest.CaptureFixture[str]) -> None:
    """A second install() replaces the first, whose summary is printed, and its mode applies."""
    gradguard.install(mode="log")
    train(bug=True)
    gradguard.install(mode="strict")
    assert "gradguard: 3 findings (mode=log)" in capsys.readouterr().err
    with pytest.raises(gradguard.ClearedBeforeStepError):
        train(bug=True)


def test_bad_arguments_raise_and_keep_the_current_install() -> None:
    """A bad mode or code raises ValueError naming it and leaves the running install in place."""
    gradguard.install(mode="strict")
    with pytest.raises(ValueError, match="mode must be one of warn, strict, log, off; got 'loud'"):
        gradguard.install(mode="loud")
    with pytest.raises(ValueError, match="GG999"):
        gradguard.install(ignore=["GG999"])
    with pytest.raises(gradguard.ClearedBeforeStepError):
        train(bug=True)


def test_ignore_silences_a_code_and_off_installs_nothing() -> None:
    """install(ignore=...) silences a code, and install(mode="off") turns gradguard off."""
    gradguard.install(mode="strict", ignore="GG102")
    train(bug=True)
    gradguard.install(mode="off")
    train(bug=True)
    assert gradguard.uninstall() == []


def test_summary_at_exit_and_warning_filter_on_the_code(
    tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    """A script with install() on top prints the summary at exit; ``-W ignore:GG102`` hides it."""
    script = tmp_path / "train.py"
    script.write_text("import gradguard\n\ngradguard.install()\n" + BUGGY_SCRIPT)
    proc = subprocess.run(
        [sys.executable, "-W", "ignore:GG102", str(script)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "trained\n"
    assert "Warning" not in proc.stderr
    title, header, row = proc.stderr.splitlines()[:3]
    assert title == "gradguard: 3 findings (mode=warn)"
    assert header.startswith("code   name ")
    assert row.split()[:4] == ["GG102", "cleared-before-step", "3", "1"]


def _install_and_run(loop) -> list[tuple[str, int, int]]:
    """Run ``loop`` under ``install(mode="log")``: the summary rows as (code, count, first step)."""
    gradguard.install(mode="log")
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loop(model, opt, [torch.randn(8, 4) for _ in range(4)])
    return [(r.code, r.count, r.first_step) for r in gradguard.uninstall()]


def test_a_stray_step_before_any_backward_is_step_without_backward(capsys) -> None:
    """install() picks the optimizer up at its first step; one that finds no gradient at
    all applied nothing, whatever came before: GG103 at step 1, the correct loop after it silent."""

    def loop(model, opt, data):
        opt.step()  # the bug: a step before any backward
        for x in data:
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()

    assert _install_and_run(loop) == [("GG103", 1, 1)]
    assert "no parameter had a gradient at the first step gradguard watched" in (
        capsys.readouterr().err
    )


def test_step_before_backward_is_reported_from_the_first_step() -> None:
    """``zero_grad(); step(); backward()``: the first step found nothing, the next ones a
    clear between backward and step: GG102 from step 1."""

    def loop(model, opt, data):
        for x in data:
            opt.zero_grad()
            opt.step()
            model(x).pow(2).mean().backward()

    assert _install_and_run(loop) == [("GG102", 4, 1)]


def test_a_lone_step_with_nothing_to_apply_is_reported_at_uninstall() -> None:
    """A script whose only step found no gradient: GG103, reported when the guard closes."""
    assert _install_and_run(lambda model, opt, data: opt.step()) == [("GG103", 1, 1)]


def test_the_first_step_of_a_correct_loop_is_silent() -> None:
    """The correct twin: the first step, unwatched before, holds backward's gradients."""

    def loop(model, opt, data):
        for x in data:
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()

    assert _install_and_run(loop) == []


def test_naming_under_install_walks_no_heap(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no model given, install() names parameters from the modules it saw run in the
    first iteration: no walk over the garbage collector's objects, however many there are."""
    import gc

    heap = [[i] for i in range(1_000_000)]  # a large program's heap
    visited = []
    for name in ("get_objects", "get_referrers"):
        real = getattr(gc, name)

        def counting(*args, _real=real, **kwargs):
            found = _real(*args, **kwargs)
            visited.append(len(found))
            return found

        monkeypatch.setattr(gc, name, counting)
    gradguard.install(mode="log")
    train(bug=True, steps=3)  # its model is a local variable: found only by running
    rows = gradguard.uninstall()
    assert [r.params for r in rows] == [("0.weight", "0.bias", "2.weight", "2.bias")]
    assert visited == []
    assert len(heap) == 1_000_000
