"""A device result still pending when a guard closes is reported, by every entry point.

On CUDA the zero check that tells a clip from a clear is read a step or more
after the step it is about. Here every result arrives only when its guard
closes (``LATENESS.until_close``), so each finding below exists only if the
entry point drains what is pending.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import gradguard
from gradguard._health import LATENESS, WAITS
from gradguard.testing import record
from tests.conftest import ALL, ROOT, Net, batches, cleared_in_place, loss_of

# The bug whose finding waits for the device: the model cleared in place between
# backward and step, which only a zero check on the gradients can tell from a clip.
LOOP = """\
import sys
import torch
from torch import nn
import gradguard
from gradguard._health import LATENESS

LATENESS.until_close = True  # every device result arrives at close, as on a slow GPU
sys.kept = []  # what it guards outlives the module: collecting it would judge what is left
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
sys.kept.append(opt)
{wrap}
for _ in range(3):
    opt.zero_grad()
    model(torch.randn(8, 4)).pow(2).mean().backward()
    model.zero_grad(set_to_none=False)
    opt.step()
"""
STEP_LINE = LOOP.splitlines().index("    opt.step()") + 1


@pytest.fixture(autouse=True)
def _late() -> None:
    LATENESS.until_close = True  # reset by conftest's device_results fixture


def _gg102(findings: list[gradguard.Finding]) -> list[gradguard.Finding]:
    return [f for f in findings if f.code == "GG102"]


def test_nothing_is_judged_before_close_under_the_switch(net: Net) -> None:
    """The switch holds results back: the entry-point tests below can fail."""
    opt = gradguard.guard(torch.optim.SGD(net.parameters(), lr=0.1), model=net, mode="log")
    cleared_in_place(net, opt)
    g = gradguard.guard_of(opt)
    assert g is not None
    assert g.findings == []
    gradguard.unguard(opt)
    assert [f.step for f in _gg102(g.findings)] == [2]


def test_unguard_reports_what_is_pending(net: Net) -> None:
    opt = gradguard.guard(torch.optim.SGD(net.parameters(), lr=0.1), model=net, mode="log")
    cleared_in_place(net, opt)
    g = gradguard.unguard(opt)
    assert g is not None
    (finding,) = _gg102(g.findings)
    # Step 1 is silent in every mode: zeros there could be nan_to_num_ of NaNs.
    assert (finding.step, finding.params) == (2, ALL)
    assert g.counts[finding] == 2  # each step's, about its own step


def test_the_end_of_guarding_reports_what_is_pending(net: Net) -> None:
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with gradguard.guarding(opt, model=net, mode="log") as g:
        cleared_in_place(net, opt)
        assert g.findings == []
    assert [(f.step, f.params) for f in _gg102(g.findings)] == [(2, ALL)]


def test_settle_reports_what_is_pending_without_closing(net: Net) -> None:
    opt = gradguard.guard(torch.optim.SGD(net.parameters(), lr=0.1), model=net, mode="log")
    cleared_in_place(net, opt)
    g = gradguard.guard_of(opt)
    assert g is not None
    g.settle()
    assert [f.step for f in _gg102(g.findings)] == [2]
    assert gradguard.guard_of(opt) is g  # still guarding
    gradguard.unguard(opt)


def test_record_keeps_every_late_finding_of_its_block(net: Net) -> None:
    opt = gradguard.guard(torch.optim.SGD(net.parameters(), lr=0.1), model=net, mode="log")
    g = gradguard.guard_of(opt)
    assert g is not None
    with record(g) as seen:
        cleared_in_place(net, opt)
    assert [(f.code, f.step) for f in seen] == [("GG102", 2), ("GG102", 3)]
    gradguard.unguard(opt)


def test_the_optimizer_being_collected_reports_what_is_pending(net: Net) -> None:
    seen: list[gradguard.Finding] = []
    opt = gradguard.guard(torch.optim.SGD(net.parameters(), lr=0.1), model=net, mode="log")
    g = gradguard.guard_of(opt)
    assert g is not None
    g._reporter.listeners.append(seen.append)
    cleared_in_place(net, opt)
    del opt
    gc.collect()
    assert g.closed
    assert [(f.code, f.step, f.params) for f in seen] == [("GG102", 2, ALL), ("GG102", 3, ALL)]


def test_uninstall_reports_the_pending_results_of_every_guard(net: Net) -> None:
    """install()'s session settles its own guards and the user's before its summary."""
    gradguard.install(mode="log")
    try:
        discovered = torch.optim.SGD(net.parameters(), lr=0.1)
        cleared_in_place(net, discovered)
        other = Net()
        user = gradguard.guard(torch.optim.Adam(other.parameters()), model=other, mode="log")
        cleared_in_place(other, user)
    finally:
        rows = gradguard.uninstall()
    (row,) = [r for r in rows if r.code == "GG102"]
    # The discovered optimizer is judged from its second step, and a clear's first
    # sighting is silent (zeros could be nan_to_num_ of NaNs): 1 step, the user's 2.
    assert row.count == 3
    g = gradguard.unguard(user)
    assert g is not None
    assert [f.step for f in _gg102(g.findings)] == [2]


def test_strict_mode_raises_at_the_step_with_the_bug(net: Net) -> None:
    """Strict mode reads a late result at the step (one sync): it raises at the step
    log mode reports first (2: a first sighting of zeros could be nan_to_num_ of
    NaNs), before that step changes a parameter."""
    opt = gradguard.guard(torch.optim.SGD(net.parameters(), lr=0.1), model=net, mode="strict")
    first, second = batches(2)
    opt.zero_grad()
    loss_of(net, first).backward()
    net.zero_grad(set_to_none=False)
    opt.step()
    opt.zero_grad()
    loss_of(net, second).backward()
    net.zero_grad(set_to_none=False)
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(gradguard.ClearedBeforeStepError) as raised:
        opt.step()
    assert raised.value.finding is not None
    assert raised.value.finding.step == 2
    assert all(torch.equal(b, p) for b, p in zip(before, net.parameters(), strict=True))
    gradguard.unguard(opt)


@pytest.mark.parametrize("clip", [False, True])
def test_strict_mode_waits_for_the_device_once_per_step(net: Net, clip: bool) -> None:
    """The norms, the zero check and the norms before a clip: one wait, for the newest."""
    opt = gradguard.guard(torch.optim.SGD(net.parameters(), lr=0.1), model=net, mode="strict")
    waits = []
    for batch in batches(6):
        before = WAITS.count
        opt.zero_grad()
        loss_of(net, batch).backward()
        if clip:
            nn.utils.clip_grad_norm_(net.parameters(), 0.01)
        opt.step()
        waits.append(WAITS.count - before)
    gradguard.unguard(opt)
    assert waits == [1] * 6


def _python(script: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args, str(script)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )


def test_interpreter_exit_reports_what_is_pending(
    tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    """A script that never closes its guard still gets its late finding, at exit."""
    script = tmp_path / "train.py"
    script.write_text(LOOP.format(wrap='gradguard.guard(opt, model=model, mode="warn")'))
    proc = _python(script, env=subprocess_env)
    assert proc.returncode == 0, proc.stderr
    assert "GG102 cleared-before-step" in proc.stderr
    assert f"train.py:{STEP_LINE}" in proc.stderr


@pytest.mark.parametrize("wrap", ["", 'gradguard.guard(opt, model=model, mode="log")'])
def test_the_runner_reports_what_is_pending(
    tmp_path: Path, subprocess_env: dict[str, str], wrap: str
) -> None:
    """Under `gradguard run`, for the optimizer it found and for one the script guards."""
    script = tmp_path / "train.py"
    script.write_text(LOOP.format(wrap=wrap))
    log = tmp_path / "run.jsonl"
    proc = _python(
        script,
        "-m",
        "gradguard",
        "run",
        "--mode",
        "log",
        "--log-json",
        str(log),
        env=subprocess_env,
    )
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in log.read_text().splitlines()]
    found = [r for r in records if r.get("code") == "GG102"]
    assert found, records
    assert found[0]["location"].endswith(f"train.py:{STEP_LINE}")
    assert "GG102" in proc.stderr  # the summary counts it


PLUGIN_TEST = """\
import pytest
import torch
from torch import nn
from gradguard._health import LATENESS


KEPT = []  # optimizers alive past their test: collecting one would judge what it left


def buggy_loop():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    KEPT.append(opt)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        model.zero_grad(set_to_none=False)
        opt.step()


def test_findings_fixture(gradguard_findings):
    LATENESS.until_close = True
    try:
        buggy_loop()
        assert gradguard_findings.codes[:1] == ["GG102"]
    finally:
        LATENESS.reset()


def test_warn_at_teardown():
    LATENESS.until_close = True
    buggy_loop()
    # nothing judged yet: the plugin's teardown drains it into this test's warnings


@pytest.mark.gradguard(mode="strict")
def test_strict():
    LATENESS.until_close = True
    try:
        buggy_loop()  # raises at the step: strict mode waits for the device there
    finally:
        LATENESS.reset()


def test_reset():
    LATENESS.reset()
"""


def test_the_pytest_plugin_reports_what_is_pending(pytester: pytest.Pytester) -> None:
    """The gradguard_findings fixture and a test's teardown see late findings; a strict
    test fails with the finding."""
    from tests.test_pytest_plugin import _run

    pytester.makepyfile(PLUGIN_TEST)
    result = _run(pytester, "--gradguard=warn", "-W", "always")
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(["*test_warn_at_teardown*", "*ClearedBeforeStepWarning*"])
    result.stdout.fnmatch_lines(["*test_strict*", "*GG102 cleared-before-step*"])


def test_a_late_finding_in_a_model_without_a_name_is_named_by_its_group() -> None:
    """Judged after the optimizer is gone, names still come from what was known."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(3))
    seen: list[gradguard.Finding] = []
    opt = gradguard.guard(torch.optim.SGD([w], lr=0.1), mode="log")
    g = gradguard.guard_of(opt)
    assert g is not None
    g._reporter.listeners.append(seen.append)
    for _ in range(2):
        opt.zero_grad()
        (w * w).sum().backward()
        w.grad.zero_()
        opt.step()
    del opt
    gc.collect()
    assert [(f.code, f.step) for f in seen] == [("GG102", 2)]
    assert seen[0].params == ("group0.param0[3]",)
