"""A lifecycle finding names every line of the user's code involved, not only the step's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import Net, batches, loss_of

import gradguard
import gradguard.testing
from gradguard._findings import make_finding


def _line(marker: str) -> str:
    """``file:line`` of the line of this file ending with ``# marker``."""
    lines = Path(__file__).read_text().splitlines()
    (number,) = [n for n, text in enumerate(lines, 1) if text.endswith(f"# {marker}")]
    return f"tests/test_story.py:{number}"


def _fired(loop) -> list[gradguard.Finding]:
    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with gradguard.guarding(opt, model=net, mode="log") as g, gradguard.testing.record(g) as got:
        loop(net, opt)
    return got


def _tutorial(net, opt):
    for batch in batches(3):
        loss_of(net, batch).backward()  # tutorial-backward
        opt.zero_grad()  # tutorial-clear
        opt.step()  # tutorial-step


def _cleared_by_the_model(net, opt):
    for batch in batches(3):
        loss_of(net, batch).backward()  # model-backward
        net.zero_grad()
        opt.step()  # model-step


def _no_zero_grad(net, opt):
    for batch in batches(3):
        loss_of(net, batch).backward()  # stale-backward
        opt.step()  # stale-step


def test_the_tutorials_bug_names_its_backward_its_clear_and_its_step():
    """GG102: backward() wrote them, zero_grad() cleared them, step() applied nothing."""
    first = _fired(_tutorial)[0]
    assert first.code == "GG102"
    assert (first.written_at, first.cleared_at, first.location) == (
        _line("tutorial-backward"),
        _line("tutorial-clear"),
        _line("tutorial-step"),
    )
    line = int(_line("tutorial-clear").rsplit(":", 1)[1])
    assert (
        f"(backward() at {_line('tutorial-backward')} wrote them, optimizer.zero_grad() at "
        f"line {line} cleared them, step() at line {line + 1} applied nothing)"
    ) in first.message


def test_a_clear_no_optimizer_made_is_named_as_such():
    """``model.zero_grad()`` between backward and step: cleared outside any optimizer."""
    first = _fired(_cleared_by_the_model)[0]
    assert first.code == "GG102"
    assert first.written_at == _line("model-backward")
    assert first.cleared_at == "outside any optimizer"
    assert "something outside any optimizer's zero_grad() cleared them" in first.message


def test_a_missing_clear_names_the_backward_that_added_to_applied_gradients():
    """GG101: backward() added to what a step applied; the step applied both."""
    first = _fired(_no_zero_grad)[0]
    assert first.code == "GG101"
    assert (first.written_at, first.cleared_at) == (_line("stale-backward"), "")
    step = int(_line("stale-step").rsplit(":", 1)[1])
    assert (
        f"(backward() at {_line('stale-backward')} added to what a step already applied, "
        f"step() at line {step} applied both, with no zero_grad() between)"
    ) in first.message


@pytest.mark.parametrize("code", ["GG103", "GG201", "GG303"])
def test_other_codes_tell_no_story(code):
    """Only the lifecycle codes about a backward's gradients tell its lines."""
    made = make_finding(
        code, step=1, optimizer="SGD#0", params=("w",), location="t.py:3", written_at="t.py:1"
    )
    assert "backward() at" not in made.message
