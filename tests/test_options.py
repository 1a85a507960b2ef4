"""One set of options wherever gradguard is turned on, laid over each other by one rule.

Each option reaches the guard from every entry point: ``gradguard run`` (its
flags, the environment, ``[tool.gradguard]``), `gradguard.install`, the pytest
plugin (its flags, ini keys, the environment, ``[tool.gradguard]``, the
marker) and a followed child process. The layers stack as the README says:
``[tool.gradguard]`` < ini < environment < command line < marker < install()
< a ``guard(...)`` argument. A bad value names the source it came from.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT
from test_pytest_plugin import _plugin_args

import gradguard
from gradguard._config import BY_NAME, OPTION_NAMES, OPTIONS, Options
from gradguard.cli import main

# Per guard option, a value other than its default: as typed (a flag, a variable,
# an ini value), and as Python, TOML and the guard hold it.
VALUES: dict[str, tuple[str, Any]] = {
    "mode": ("log", "log"),
    "ignore": ("GG105,GG103", ["GG103", "GG105"]),
    "accumulation_steps": ("4", 4),
    "check_numerics": ("false", False),
    "numerics_every": ("3", 3),
    "explode_factor": ("7.5", 7.5),
    "max_grad_norm": ("2.5", 2.5),
    "unused_after": ("2", 2),
    "record_norms": ("true", True),
    "check_ranks_every": ("5", 5),
}
EXPECTED = {name: value for name, (_, value) in VALUES.items()}

# Two steps of an optimizer no code guards, then its guard's options as JSON on
# the last line of stdout. argv[1], if given, is JSON for a guard(...) call of its own.
SHOW = """\
import dataclasses, json, sys

import torch

import gradguard

model = torch.nn.Linear(2, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
if sys.argv[1:]:
    gradguard.guard(opt, **json.loads(sys.argv[1]))
for _ in range(2):
    opt.zero_grad()
    model(torch.ones(4, 2)).pow(2).mean().backward()
    opt.step()
options = dataclasses.asdict(gradguard.guard_of(opt).options)
options["ignore"] = sorted(options["ignore"])
print(json.dumps(options))
"""


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)  # strings, numbers and lists of strings read the same in TOML


def _pyproject(values: dict[str, Any]) -> str:
    return "[tool.gradguard]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in values.items())


def _flags(values: dict[str, tuple[str, Any]], pytest_flags: bool = False) -> list[str]:
    """Each option as its flag: ``--name TEXT``, or ``--name`` / ``--no-name`` for a switch."""
    argv = []
    for name, (text, value) in values.items():
        flag = BY_NAME[name].pytest_flag if pytest_flags else BY_NAME[name].flag
        if BY_NAME[name].boolean:
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv.append(f"{flag}={text}")
    return argv


def _shown(out: str) -> dict[str, Any]:
    """The guard's options the SHOW script printed last."""
    return dict(json.loads(out.splitlines()[-1]))


def test_the_table_has_one_row_per_option_and_every_entry_point_takes_each() -> None:
    """Every guard option is a row of the table; guard(), guarding() and install() take each,
    showing its default; each test value here differs from that default."""
    assert [o.name for o in OPTIONS] == [*OPTION_NAMES, "log_json"]
    assert set(VALUES) == set(OPTION_NAMES)
    defaults = {f.name: f.default for f in dataclasses.fields(Options)}
    for name, value in EXPECTED.items():
        assert value != defaults[name], name
    for entry in (gradguard.guard, gradguard.guarding, gradguard.install):
        parameters = inspect.signature(entry).parameters
        assert set(OPTION_NAMES) <= set(parameters), entry.__name__
        for name in OPTION_NAMES:
            shown = repr(parameters[name].default)
            if name not in ("mode", "ignore", "record_norms"):  # None: the session's
                assert shown == repr(defaults[name]), (entry.__name__, name)


def test_the_readmes_table_of_options_has_a_row_for_each_naming_it_everywhere() -> None:
    """The README's table names each option's flag, pytest flag, ini key and variable."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = {
        line.split("|")[1].strip().split()[0]: line
        for line in readme.splitlines()
        if line.startswith("| `") and "GRADGUARD" in line
    }
    assert list(rows) == [f"`{o.name}`" for o in OPTIONS]
    for option in OPTIONS:
        row = rows[f"`{option.name}`"]
        for name in (option.flag, option.pytest_flag, option.ini, option.env):
            assert f"`{name}`" in row, (option.name, name)


# -- gradguard run ---------------------------------------------------------------------


Run = Callable[[list[str]], tuple[int, str, str]]


@pytest.fixture
def run(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    isolated_sys: None,
) -> Run:
    """``gradguard run ARGV``, in this process and in ``tmp_path`` (which holds ``show.py``):
    its exit status, stdout and stderr."""
    (tmp_path / "show.py").write_text(SHOW)
    monkeypatch.chdir(tmp_path)

    def run(argv: list[str]) -> tuple[int, str, str]:
        code = main(["run", *argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.mark.parametrize("source", ["flags", "environment", "pyproject"])
def test_every_option_reaches_the_guard_from_each_of_the_runners_sources(
    source: str, run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gradguard run's flags, GRADGUARD_<NAME> and [tool.gradguard] each set every option of
    the guard it attaches, and the JSON log; a pyproject's paths are relative to it."""
    work = tmp_path / "sub"  # [tool.gradguard] is found in a directory above
    work.mkdir()
    (work / "show.py").write_text(SHOW)
    monkeypatch.chdir(work)
    argv = ["show.py"]
    if source == "flags":
        argv = [*_flags(VALUES), "--log-json=gg.jsonl", *argv]
        log = work / "gg.jsonl"
    elif source == "environment":
        for name, (text, _) in VALUES.items():
            monkeypatch.setenv(BY_NAME[name].env, text)
        monkeypatch.setenv("GRADGUARD_LOG_JSON", "gg.jsonl")
        log = work / "gg.jsonl"
    else:
        (tmp_path / "pyproject.toml").write_text(_pyproject({**EXPECTED, "log_json": "gg.jsonl"}))
        log = tmp_path / "gg.jsonl"
    code, out, err = run(argv)
    assert code == 0, err
    assert _shown(out) == EXPECTED
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["event"] for r in records] == ["norms"]  # the discovered guard's second step


LARGE_NORMS = """\
import torch

torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
opt = torch.optim.SGD(model.parameters(), lr=1e-6)  # the norm stays near 100 throughout
for _ in range(4):
    opt.zero_grad()
    (100 * model(torch.ones(8, 4))).mean().backward()
    opt.step()
"""


def test_max_grad_norm_from_the_command_line_reports_gg202(run: Run, tmp_path: Path) -> None:
    """--max-grad-norm makes an otherwise silent loop with a large norm report GG202."""
    (tmp_path / "train.py").write_text(LARGE_NORMS)
    assert run(["--mode=log", "train.py"]) == (0, "", "")
    code, _, err = run(["--mode=log", "--max-grad-norm", "1", "train.py"])
    assert code == 0
    assert "GG202 exploding-gradient" in err


def test_the_runners_layers_stack_and_the_code_wins(
    run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """[tool.gradguard] < environment < flag < guard() argument, an explicit None included."""
    (tmp_path / "pyproject.toml").write_text(
        _pyproject(
            {
                "mode": "strict",
                "unused_after": 11,
                "accumulation_steps": 11,
                "max_grad_norm": 11.0,
                "numerics_every": 11,
                "explode_factor": 11.0,
            }
        )
    )
    monkeypatch.setenv("GRADGUARD", "warn")
    monkeypatch.setenv("GRADGUARD_ACCUMULATION_STEPS", "13")
    monkeypatch.setenv("GRADGUARD_MAX_GRAD_NORM", "13")
    monkeypatch.setenv("GRADGUARD_EXPLODE_FACTOR", "13")
    flags = ["--mode=log", "--max-grad-norm=14", "--explode-factor=14"]
    code, out, err = run([*flags, "show.py", '{"explode_factor": 16, "numerics_every": null}'])
    assert code == 0, err
    shown = _shown(out)
    assert shown["mode"] == "log"
    assert shown["unused_after"] == 11
    assert shown["accumulation_steps"] == 13
    assert shown["max_grad_norm"] == 14.0
    assert shown["explode_factor"] == 16.0
    assert shown["numerics_every"] is None  # passed: it wins over the session's 11


INSTALLS = """\
import gradguard

gradguard.install(mode="log", unused_after=3)
with open("show.py") as f:
    exec(f.read())
gradguard.uninstall()
"""


def test_install_in_a_run_sets_what_it_passes_and_the_run_decides_the_rest(
    run: Run, tmp_path: Path
) -> None:
    """install(...) inside gradguard run wins for what it passes; the rest stays the run's."""
    (tmp_path / "installs.py").write_text(INSTALLS)
    flags = ["--mode=strict", "--unused-after=7", "--accumulation-steps=4"]
    code, out, err = run([*flags, "installs.py"])
    assert code == 0, err
    shown = _shown(out)
    assert (shown["mode"], shown["unused_after"], shown["accumulation_steps"]) == ("log", 3, 4)


@pytest.mark.parametrize(
    ("argv", "env", "pyproject", "said"),
    [
        (
            ["--accumulation-steps", "0"],
            {},
            "",
            "--accumulation-steps must be a positive int; got 0",
        ),
        (
            ["--explode-factor=lots"],
            {},
            "",
            "--explode-factor must be a finite number above 1; got 'lots'",
        ),
        (
            [],
            {"GRADGUARD_ACCUMULATION_STEPS": "0"},
            "",
            "the GRADGUARD_ACCUMULATION_STEPS environment variable must be a positive int; got 0",
        ),
        (
            [],
            {"GRADGUARD_CHECK_NUMERICS": "maybe"},
            "",
            "the GRADGUARD_CHECK_NUMERICS environment variable must be True or False; got 'maybe'",
        ),
        (
            [],
            {},
            "accumulation_steps = 0",
            "accumulation_steps in [tool.gradguard] of {path} must be a positive int; got 0",
        ),
        (
            [],
            {},
            'check_ranks_every = "2"',
            "check_ranks_every in [tool.gradguard] of {path} must be a positive int or None; "
            "got '2'",
        ),
        (
            [],
            {},
            "accumulation = 4",
            "[tool.gradguard] of {path} has no option 'accumulation'; the options are mode,",
        ),
        ([], {}, "mode = ", "cannot read [tool.gradguard] from {path}: "),
        (
            [],
            {},
            "record_norms = true",
            "record_norms in [tool.gradguard] of {path} needs --log-json PATH",
        ),
    ],
    ids=[
        "flag",
        "flag-text",
        "environment",
        "environment-bool",
        "pyproject",
        "pyproject-type",
        "pyproject-key",
        "pyproject-toml",
        "pyproject-log",
    ],
)
def test_a_bad_value_stops_the_runner_naming_its_source(
    argv: list[str],
    env: dict[str, str],
    pyproject: str,
    said: str,
    run: Run,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A bad value from a flag, a variable or [tool.gradguard] exits 2 with one line naming it."""
    if pyproject:
        (tmp_path / "pyproject.toml").write_text(f"[tool.gradguard]\n{pyproject}\n")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as info:
        run([*argv, "show.py"])
    out, err = capsys.readouterr()
    assert (info.value.code, out) == (2, "")
    (line,) = err.splitlines()
    expected = "gradguard run: error: " + said.format(path=tmp_path / "pyproject.toml")
    assert line.startswith(expected), line


SPAWNER = """\
import subprocess, sys

subprocess.run([sys.executable, "child.py"], check=True)
"""


def test_a_followed_child_gets_every_option_of_the_run(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    isolated_sys: None,
) -> None:
    """A python subprocess of gradguard run guards its optimizer with all the run's options."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    (tmp_path / "spawner.py").write_text(SPAWNER)
    (tmp_path / "child.py").write_text(SHOW)
    monkeypatch.chdir(tmp_path)
    code = main(["run", *_flags(VALUES), "--log-json=gg.jsonl", "spawner.py"])
    out, err = capfd.readouterr()
    assert code == 0, err
    assert _shown(out) == EXPECTED


# -- install() ---------------------------------------------------------------------------


def test_install_gives_every_option_to_the_guards_it_attaches(tmp_path: Path) -> None:
    """install(...) with every option: the guard of an optimizer it discovers has them all."""
    gradguard.install(**EXPECTED, log_json=tmp_path / "gg.jsonl")
    try:
        model = torch.nn.Linear(2, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            model(torch.ones(4, 2)).sum().backward()
            opt.step()
        options = dataclasses.asdict(gradguard.guard_of(opt).options)
    finally:
        gradguard.uninstall()
    assert {**options, "ignore": sorted(options["ignore"])} == EXPECTED


def test_unused_after_from_install_reports_gg301_early() -> None:
    """install(unused_after=2) reports a layer no loss reaches within 4 steps, not after 20."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gradguard.install(mode="log", unused_after=2)
    try:
        for _ in range(4):
            opt.zero_grad()
            model[1](torch.ones(4, 2)).sum().backward()  # model[0] never takes part
            opt.step()
    finally:
        rows = gradguard.uninstall()
    assert [(r.code, r.first_step) for r in rows] == [("GG301", 3)]


# -- the pytest plugin ------------------------------------------------------------------

# Writes its guard's options to options-<test name>.json for the test outside to read.
PLUGIN_TESTS = """\
import dataclasses, json, pathlib

import pytest
import torch

import gradguard


def options(name, **guard):
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    if guard:
        gradguard.guard(opt, **guard)
    for _ in range(2):
        opt.zero_grad()
        model(torch.ones(4, 2)).pow(2).mean().backward()
        opt.step()
    shown = dataclasses.asdict(gradguard.guard_of(opt).options)
    shown["ignore"] = sorted(shown["ignore"])
    pathlib.Path(f"options-{name}.json").write_text(json.dumps(shown))


def test_run():
    options("run")
"""


def _inline(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_inprocess(*_plugin_args(), "-p", "no:cacheprovider", *args)


def _written(pytester: pytest.Pytester, name: str) -> dict[str, Any]:
    return dict(json.loads((pytester.path / f"options-{name}.json").read_text()))


@pytest.mark.parametrize("source", ["command line", "ini", "environment", "pyproject", "marker"])
def test_every_option_reaches_the_guard_from_each_of_the_plugins_sources(
    source: str, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--gradguard-<name>, ini gradguard_<name>, GRADGUARD_<NAME>, [tool.gradguard] and the
    marker each set every option of the guards a test's session attaches."""
    for var in (o.env for o in OPTIONS):
        monkeypatch.delenv(var, raising=False)
    tests = PLUGIN_TESTS
    args: list[str] = []
    if source == "command line":
        args = [*_flags(VALUES, pytest_flags=True), "--gradguard-log-json=gg.jsonl"]
    elif source == "ini":
        lines = "".join(f"{BY_NAME[k].ini} = {text}\n" for k, (text, _) in VALUES.items())
        pytester.makefile(".ini", pytest=f"[pytest]\n{lines}gradguard_log_json = gg.jsonl\n")
    elif source == "environment":
        for name, (text, _) in VALUES.items():
            monkeypatch.setenv(BY_NAME[name].env, text)
        monkeypatch.setenv("GRADGUARD_LOG_JSON", "gg.jsonl")
    elif source == "pyproject":
        pytester.makepyprojecttoml(_pyproject({**EXPECTED, "log_json": "gg.jsonl"}))
    else:  # the marker turns gradguard on for its test alone
        marks = ", ".join(f"{k}={v!r}" for k, v in EXPECTED.items())
        tests = tests.replace("def test_run", f"@pytest.mark.gradguard({marks})\ndef test_run")
    pytester.makepyfile(tests)
    result = _inline(pytester, *args)
    result.assert_outcomes(passed=1)
    assert _written(pytester, "run") == EXPECTED
    if source != "marker":  # the marker has no log of its own to name
        assert (pytester.path / "gg.jsonl").read_text().count('"event": "norms"') == 1


PRECEDENCE_TESTS = (
    PLUGIN_TESTS
    + """

@pytest.mark.gradguard(max_grad_norm=15.0, explode_factor=15.0, ignore=["GG105"])
def test_marked():
    options("marked", explode_factor=16.0)
"""
)


def test_the_plugins_layers_stack_and_the_code_wins(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """[tool.gradguard] < ini < environment < command line < marker < guard() argument,
    one option deciding each layer; a marker's ignored codes add to the run's."""
    for var in (o.env for o in OPTIONS):
        monkeypatch.delenv(var, raising=False)
    numbers = ("unused_after", "numerics_every", "check_ranks_every", "accumulation_steps")
    floats = ("max_grad_norm", "explode_factor")
    pytester.makepyprojecttoml(
        _pyproject(
            {"mode": "strict", "ignore": ["GG103"]}
            | dict.fromkeys(numbers, 11)
            | dict.fromkeys(floats, 11.0)
        )
    )
    ini = "".join(f"gradguard_{name} = 12\n" for name in (*numbers[1:], *floats))
    pytester.makefile(".ini", pytest=f"[pytest]\ngradguard = warn\n{ini}")
    for name in (*numbers[2:], *floats):
        monkeypatch.setenv(BY_NAME[name].env, "13")
    monkeypatch.setenv("GRADGUARD", "warn")
    args = ["--gradguard=log", *(f"{BY_NAME[n].pytest_flag}=14" for n in (*numbers[3:], *floats))]
    pytester.makepyfile(PRECEDENCE_TESTS)
    result = _inline(pytester, *args)
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["gradguard: mode=log (from command line), ignore=GG103, *"])
    layers = {"unused_after": 11, "numerics_every": 12, "check_ranks_every": 13}
    expected = {**layers, "accumulation_steps": 14, "mode": "log", "ignore": ["GG103"]}
    assert _written(pytester, "run") == {
        **dataclasses.asdict(Options()),
        **expected,
        "max_grad_norm": 14.0,
        "explode_factor": 14.0,
    }
    assert _written(pytester, "marked") == {
        **dataclasses.asdict(Options()),
        **expected,
        "ignore": ["GG103", "GG105"],
        "max_grad_norm": 15.0,
        "explode_factor": 16.0,
    }


ACCUMULATES_BY_THREE = """\
import pytest
import torch


@pytest.mark.gradguard(accumulation_steps=2)
def test_accumulates(gradguard_findings):
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(4):
        opt.zero_grad()
        for _ in range(3):
            model(torch.ones(4, 2)).sum().backward()
        opt.step()
    assert gradguard_findings.codes == ["GG104"]
"""


def test_accumulation_steps_from_the_marker_reports_gg104(pytester: pytest.Pytester) -> None:
    """A marker declaring 2 micro-batches on a loop that steps every 3 gets GG104."""
    pytester.makepyfile(ACCUMULATES_BY_THREE)
    _inline(pytester).assert_outcomes(passed=1)


@pytest.mark.parametrize(
    ("pyproject", "said"),
    [
        ("unused_after = 0", "unused_after in [tool.gradguard] of {path} must be a positive int"),
        (
            "mode = 'loud'",
            "mode in [tool.gradguard] of {path} must be one of warn, strict, log, off",
        ),
        ("explode = 3", "[tool.gradguard] of {path} has no option 'explode'"),
    ],
    ids=["value", "mode", "key"],
)
def test_a_bad_value_in_the_pyproject_table_is_a_usage_error_naming_the_file(
    pyproject: str, said: str, pytester: pytest.Pytester
) -> None:
    """A bad [tool.gradguard] value stops pytest with a usage error naming the key and file."""
    path = pytester.makepyprojecttoml(f"[tool.gradguard]\n{pyproject}\n")
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = _inline(pytester)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    expected = f"ERROR: gradguard: {said.format(path=path)}"
    assert any(line.startswith(expected) for line in result.stderr.lines), result.stderr.lines


def test_collecting_an_unrelated_project_imports_no_torch_through_the_plugin(
    pytester: pytest.Pytester,
) -> None:
    """``python -X importtime -m pytest --co -p gradguard`` in a project that never uses
    gradguard loads the plugin and imports no torch, nor gradguard's modules that need it."""
    pytester.makepyfile("def test_adds():\n    assert 1 + 1 == 2\n")
    plugin = "gradguard" if not _plugin_args() else "pytest_gradguard"  # the entry point's name
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    for var in (o.env for o in OPTIONS):
        env.pop(var, None)
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "pytest", "--co", "-p", plugin],
        cwd=pytester.path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "test_adds" in proc.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()}
    assert "gradguard._config" in imported  # the plugin loaded, and read its table of options
    assert not {m for m in imported if m == "torch" or m.startswith("torch.")}
    assert not imported & {"gradguard._api", "gradguard._guard", "gradguard._session"}
