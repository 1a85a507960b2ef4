"""The pytest plugin, run with pytester in fresh pytest processes as users run it."""

from __future__ import annotations

import importlib.metadata
import json

import pytest

pytestmark = pytest.mark.usefixtures("subprocess_env")

LOOPS = """
import pytest
import torch


def train(bug, steps=3):
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 2)
    for _ in range(steps):
        if not bug:
            opt.zero_grad()
        model(x).pow(2).mean().backward()
        if bug:
            opt.zero_grad()
        opt.step()
"""


def _plugin_args() -> list[str]:
    """Load the plugin by name when this environment has not installed its entry point."""
    entry_points = importlib.metadata.entry_points(group="pytest11")
    if any(ep.value == "pytest_gradguard" for ep in entry_points):
        return []
    return ["-p", "pytest_gradguard"]


# Plugins of this environment that the runs do not need; each costs startup time.
_QUIET_PLUGINS = ("-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-p", "no:benchmark")


def _run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(*_plugin_args(), *_QUIET_PLUGINS, *args, timeout=120)


def test_strict_fails_the_buggy_test_with_the_finding_and_passes_the_rest(
    pytester: pytest.Pytester,
) -> None:
    """Under --gradguard=strict the buggy test fails with GG102's message; the others pass."""
    pytester.makepyfile(
        LOOPS
        + """
def test_buggy():
    train(bug=True)


def test_correct():
    train(bug=False)


def test_recorded(gradguard_findings):
    train(bug=True)
    assert gradguard_findings.codes == ["GG102"]


def test_recorded_again_same_loop(gradguard_findings):
    train(bug=True)
    finding = gradguard_findings.pop("GG102")
    assert finding.step == 1 and len(gradguard_findings) == 0
"""
    )
    result = _run(pytester, "--gradguard=strict", "-v")
    result.assert_outcomes(failed=1, passed=3)
    result.stdout.fnmatch_lines(
        [
            "gradguard: mode=strict (from command line)",
            "*::test_buggy FAILED*",
            "*::test_correct PASSED*",
            "*ClearedBeforeStepError: GG102 cleared-before-step: *",
            "*.py:*: ClearedBeforeStepError",
        ]
    )
    result.stdout.no_fnmatch_line("*gradguard/_dispatch.py*")


def test_buggy_test_passes_with_the_plugin_off(pytester: pytest.Pytester) -> None:
    """Without --gradguard (or with the plugin disabled) the same buggy test passes."""
    pytester.makepyfile(LOOPS + "\n\ndef test_buggy():\n    train(bug=True)\n")
    result = _run(pytester)
    result.assert_outcomes(passed=1)
    result.stdout.no_fnmatch_line("gradguard:*")


def test_marker_overrides_the_command_line(pytester: pytest.Pytester) -> None:
    """@pytest.mark.gradguard(mode=...) wins over --gradguard, in both directions."""
    pytester.makepyfile(
        LOOPS
        + """
@pytest.mark.gradguard(mode="off")
def test_buggy_but_off():
    train(bug=True)


@pytest.mark.gradguard(mode="strict", ignore=["GG103"])
def test_buggy_and_strict():
    train(bug=True)
"""
    )
    result = _run(pytester, "--gradguard=log", "-v")
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(
        ["*::test_buggy_but_off PASSED*", "*::test_buggy_and_strict FAILED*"]
    )


def test_ini_key_sets_the_mode(pytester: pytest.Pytester) -> None:
    """``gradguard = strict`` in the ini file makes a buggy test fail."""
    pytester.makeini("[pytest]\ngradguard = strict\n")
    pytester.makepyfile(LOOPS + "\n\ndef test_buggy():\n    train(bug=True)\n")
    result = _run(pytester)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["gradguard: mode=strict (from ini)"])


@pytest.mark.parametrize(
    ("ini", "env", "cli", "header"),
    [
        ("log", "strict", None, "gradguard: mode=strict (from environment)"),
        ("log", "strict", "warn", "gradguard: mode=warn (from command line)"),
    ],
)
def test_command_line_beats_environment_beats_ini(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    ini: str,
    env: str | None,
    cli: str | None,
    header: str,
) -> None:
    """The report header shows the mode chosen by command line > environment > ini."""
    pytester.makeini(f"[pytest]\ngradguard = {ini}\n")
    pytester.makepyfile("def test_nothing():\n    pass\n")
    if env is not None:
        monkeypatch.setenv("GRADGUARD", env)
    result = _run(pytester, "--collect-only", *([f"--gradguard={cli}"] if cli else []))
    result.stdout.fnmatch_lines([header])


@pytest.mark.parametrize(
    ("ini", "env", "cli", "named"),
    [
        ("loud", None, None, "ini option gradguard"),
        (None, "loud", None, "the GRADGUARD environment variable"),
        (None, None, "loud", "the --gradguard option"),
        (None, None, "off --gradguard-ignore=GG1", "the --gradguard-ignore option"),
    ],
)
def test_bad_values_name_the_layer_they_came_from(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    ini: str | None,
    env: str | None,
    cli: str | None,
    named: str,
) -> None:
    """An invalid mode or code is a usage error that says where the value came from."""
    if ini is not None:
        pytester.makeini(f"[pytest]\ngradguard = {ini}\n")
    if env is not None:
        monkeypatch.setenv("GRADGUARD", env)
    pytester.makepyfile("def test_nothing():\n    pass\n")
    args = [f"--gradguard={cli.split()[0]}", *cli.split()[1:]] if cli else []
    result = _run(pytester, *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: gradguard: {named} *"])


def test_warn_mode_lists_findings_in_the_warnings_summary_and_json_log(
    pytester: pytest.Pytester,
) -> None:
    """Under --gradguard=warn the finding is in pytest's warnings summary and in the JSON log."""
    pytester.makepyfile(LOOPS + "\n\ndef test_buggy():\n    train(bug=True)\n")
    result = _run(pytester, "--gradguard=warn", "--gradguard-log-json=gg.jsonl")
    result.assert_outcomes(passed=1, warnings=1)
    result.stdout.fnmatch_lines(
        ["*warnings summary*", "*ClearedBeforeStepWarning: GG102 cleared-before-step*"]
    )
    lines = (pytester.path / "gg.jsonl").read_text().splitlines()
    record, summary = [json.loads(line) for line in lines]
    assert (record["code"], record["params"]) == ("GG102", ["weight", "bias"])
    assert (summary["event"], summary["counts"]) == ("summary", {"GG102": 3})


def test_a_run_whose_tests_import_gradguard_but_never_guard_ends_without_torch(
    pytester: pytest.Pytester,
) -> None:
    """With gradguard off, tests importing its errors (one failing) never make it import torch."""
    pytester.makeconftest(
        """
import sys


def pytest_sessionfinish(session):
    (session.config.rootpath / "torch_imported.txt").write_text(str("torch" in sys.modules))
"""
    )
    pytester.makepyfile(
        test_unrelated="def test_adds():\n    assert 1 + 1 == 2\n",
        test_uses_errors="""
import gradguard


def test_errors_are_runtime_errors():
    assert issubclass(gradguard.StaleGradientError, RuntimeError)


def test_fails():
    assert gradguard.CATALOGUE["GG101"].name == "stale"
""",
    )
    result = _run(pytester)
    result.assert_outcomes(passed=2, failed=1)
    assert (pytester.path / "torch_imported.txt").read_text() == "False"


def test_record_norms_in_a_test_goes_to_the_runs_json_log(pytester: pytest.Pytester) -> None:
    """A test's guard(..., record_norms=True) writes one norms record per step to the run's log."""
    pytester.makepyfile(
        """
import gradguard
import torch


def test_trains():
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    opt = gradguard.guard(torch.optim.SGD(model.parameters(), lr=0.1), record_norms=True)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 2)).pow(2).mean().backward()
        opt.step()
"""
    )
    result = _run(pytester, "--gradguard=log", "--gradguard-log-json=gg.jsonl")
    result.assert_outcomes(passed=1)
    records = [json.loads(line) for line in (pytester.path / "gg.jsonl").read_text().splitlines()]
    assert [(r["event"], r["step"], list(r["modules"])) for r in records] == [
        ("norms", step, ["weight", "bias"]) for step in (1, 2, 3)
    ]
