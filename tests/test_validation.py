"""Every public entry point, given a wrong type or value, says what is wrong at the call.

Each row names the entry point, the bad argument, the error expected and the
words its message must hold: the value's repr, where it came from (the
argument, the flag, the environment variable, the pytest option, ini key or
marker) and what is allowed. A rejected call leaves nothing behind.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT, batches, loss_of
from loops import train
from test_pytest_plugin import _plugin_args

import gradguard
import gradguard.testing
from gradguard import _session
from gradguard._guard import _GUARDS
from gradguard.cli import main

MODES = "warn, strict, log"
SETTINGS = "warn, strict, log, off"
CODES = "'GG101,GG103'"  # how a message shows the form codes take


@dataclass(frozen=True)
class Row:
    """A bad argument: what it is, the error it must raise and the words its message must hold."""

    argument: str
    kwargs: dict[str, Any]
    error: type[Exception]
    words: tuple[str, ...]

    def __str__(self) -> str:
        return self.argument


def _rows(*rows: tuple[dict[str, Any], type[Exception], tuple[str, ...]]) -> list[Row]:
    return [Row(", ".join(f"{k}={v!r}" for k, v in kw.items()), kw, e, w) for kw, e, w in rows]


# -- guard, guarding, GradGuardCallback: the options -------------------------------

NAN, INF = float("nan"), float("inf")
OPTIONS = _rows(
    ({"mode": 5}, TypeError, ("got 5", "mode", MODES)),
    ({"mode": "strcit"}, ValueError, ("'strcit'", "mode", MODES)),
    ({"mode": "off"}, ValueError, ("'off'", "mode must be one of", MODES)),
    ({"ignore": 5}, TypeError, ("got 5", "ignore", CODES)),
    ({"ignore": b"GG101"}, TypeError, ("b'GG101'", "ignore", CODES)),
    ({"ignore": [101]}, TypeError, ("got 101", "ignore", "as str")),
    ({"ignore": "GG101,GG999"}, ValueError, ("'GG999'", "ignore", "known codes: GG101")),
    ({"accumulation_steps": True}, TypeError, ("got True", "accumulation_steps", "positive int")),
    ({"accumulation_steps": 0}, ValueError, ("got 0", "accumulation_steps", "positive int")),
    ({"accumulation_steps": 2.0}, TypeError, ("got 2.0", "accumulation_steps", "positive int")),
    ({"accumulation_steps": "4"}, TypeError, ("got '4'", "accumulation_steps", "positive int")),
    ({"unused_after": True}, TypeError, ("got True", "unused_after", "positive int")),
    ({"unused_after": None}, TypeError, ("got None", "unused_after", "positive int")),
    ({"unused_after": -1}, ValueError, ("got -1", "unused_after", "positive int")),
    ({"numerics_every": True}, TypeError, ("got True", "numerics_every", "positive int")),
    ({"numerics_every": 0}, ValueError, ("got 0", "numerics_every", "positive int")),
    ({"check_ranks_every": True}, TypeError, ("got True", "check_ranks_every", "positive int")),
    ({"check_ranks_every": 0}, ValueError, ("got 0", "check_ranks_every", "positive int")),
    ({"check_ranks_every": "2"}, TypeError, ("got '2'", "check_ranks_every", "positive int")),
    ({"check_numerics": 1}, TypeError, ("got 1", "check_numerics", "True or False")),
    ({"record_norms": "yes"}, TypeError, ("got 'yes'", "record_norms", "True or False")),
    ({"explode_factor": NAN}, ValueError, ("got nan", "explode_factor", "finite number above 1")),
    ({"explode_factor": INF}, ValueError, ("got inf", "explode_factor", "finite number above 1")),
    ({"explode_factor": 1}, ValueError, ("got 1", "explode_factor", "finite number above 1")),
    ({"explode_factor": 0.5}, ValueError, ("got 0.5", "explode_factor", "above 1")),
    ({"explode_factor": True}, TypeError, ("got True", "explode_factor", "above 1")),
    ({"explode_factor": None}, TypeError, ("got None", "explode_factor", "above 1")),
    ({"explode_factor": "2"}, TypeError, ("got '2'", "explode_factor", "above 1")),
    ({"max_grad_norm": 0}, ValueError, ("got 0", "max_grad_norm", "finite number above 0")),
    ({"max_grad_norm": -1.0}, ValueError, ("got -1.0", "max_grad_norm", "above 0")),
    ({"max_grad_norm": INF}, ValueError, ("got inf", "max_grad_norm", "above 0")),
    ({"max_grad_norm": NAN}, ValueError, ("got nan", "max_grad_norm", "above 0")),
    ({"max_grad_norm": "1"}, TypeError, ("got '1'", "max_grad_norm", "above 0 or None")),
    ({"max_grad_norm": torch.tensor(1.0)}, TypeError, ("tensor(1.)", "max_grad_norm", "None")),
)
# model= is checked by guard and guarding; the callback takes the LightningModule.
MODEL = _rows(
    ({"model": 5}, TypeError, ("int (5)", "model", "nn.Module, a list of them, or None")),
    ({"model": "net"}, TypeError, ("str ('net')", "model", "nn.Module")),
    ({"model": torch.zeros(2)}, TypeError, ("Tensor (tensor([0., 0.]))", "model", "nn.Module")),
    ({"model": [torch.nn.Linear(1, 1), "head"]}, TypeError, ("'head'", "item", "nn.Module")),
)


def _assert_says(exc: pytest.ExceptionInfo[Exception], row: Row) -> None:
    message = str(exc.value)
    assert "\n" not in message
    for word in row.words:
        assert word in message, f"{word!r} is not in {message!r}"


def _assert_untouched(opt: torch.optim.Optimizer, net: torch.nn.Module) -> None:
    """No guard, no hook, no wrapper: the optimizer is as it was built."""
    assert gradguard.guard_of(opt) is None
    assert opt not in _GUARDS
    assert not opt._optimizer_step_pre_hooks
    assert not opt._optimizer_step_post_hooks
    assert not any(p._post_accumulate_grad_hooks for p in net.parameters())
    assert "zero_grad" not in opt.__dict__
    assert "add_param_group" not in opt.__dict__


@pytest.mark.parametrize("row", OPTIONS + MODEL, ids=str)
@pytest.mark.parametrize("entry", ["guard", "guarding"])
def test_guard_options(net: torch.nn.Module, entry: str, row: Row) -> None:
    """A wrong option to guard or guarding raises at the call and attaches nothing."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(row.error) as exc:
        getattr(gradguard, entry)(opt, **row.kwargs)  # guarding: before any ``with``
    _assert_says(exc, row)
    _assert_untouched(opt, net)


CALLBACKS = ["gradguard.lightning", "gradguard.transformers"]


def _callback(module: str) -> Any:
    """``module``'s GradGuardCallback; the test is skipped where its framework is missing."""
    return pytest.importorskip(module, exc_type=ImportError).GradGuardCallback


@pytest.mark.parametrize("row", OPTIONS, ids=str)
@pytest.mark.parametrize("module", CALLBACKS)
def test_callback_options(module: str, row: Row) -> None:
    """GradGuardCallback checks the same options, with the same words, at construction."""
    with pytest.raises(row.error) as exc:
        _callback(module)(**row.kwargs)
    _assert_says(exc, row)


@pytest.mark.parametrize(
    "row",
    _rows(
        ({"mode": ""}, ValueError, ("got ''", "mode", MODES)),
        ({"mode": 0}, TypeError, ("got 0", "mode", MODES)),
        ({"model": 1}, TypeError, ("'model'", "GradGuardCallback()", "accumulation_steps")),
        ({"check_rank_every": 2}, TypeError, ("'check_rank_every'", "check_ranks_every")),
    ),
    ids=str,
)
@pytest.mark.parametrize("module", CALLBACKS)
def test_callback_arguments(module: str, row: Row) -> None:
    """An empty or falsy mode is no default, and an unknown option is named with the known."""
    with pytest.raises(row.error) as exc:
        _callback(module)(**row.kwargs)
    _assert_says(exc, row)


@pytest.mark.parametrize("module", CALLBACKS)
def test_callback_takes_codes_as_a_string(module: str) -> None:
    """``ignore="GG101,GG103"`` is two codes, not ten letters to be rejected inside training."""
    assert _callback(module)(ignore="gg101,GG103").ignore == ["GG101", "GG103"]


# -- what is not an optimizer ------------------------------------------------------------

NOT_OPTIMIZERS: list[tuple[str, Callable[[torch.nn.Module], object], tuple[str, ...]]] = [
    ("None", lambda net: None, ("NoneType (None)", "torch.optim.Optimizer")),
    ("'sgd'", lambda net: "sgd", ("str ('sgd')", "torch.optim.Optimizer")),
    ("parameters", lambda net: list(net.parameters()), ("list ([Parameter", "Optimizer")),
    ("model", lambda net: net, ("not the model (Net)",)),
]


@pytest.mark.parametrize(
    ("what", "make", "words"), NOT_OPTIMIZERS, ids=[r[0] for r in NOT_OPTIMIZERS]
)
@pytest.mark.parametrize("entry", ["guard", "guarding", "unguard", "guard_of"])
def test_what_is_not_an_optimizer(
    net: torch.nn.Module,
    entry: str,
    what: str,
    make: Callable[[Any], object],
    words: tuple[str, ...],
) -> None:
    """Each function taking an optimizer names itself and what it got instead, on one line."""
    with pytest.raises(TypeError) as exc:
        getattr(gradguard, entry)(make(net))
    message = str(exc.value)
    assert message.startswith(f"{entry}() ")
    assert "\n" not in message
    for word in words:
        assert word in message


@pytest.mark.parametrize(
    ("what", "make", "words"),
    [
        ("None", lambda opt: None, ("got NoneType (None)", "gradguard.Guard", "guard_of(opt)")),
        ("optimizer", lambda opt: opt, ("not the optimizer (SGD)", "record(gradguard.guard_of")),
        ("a list", lambda opt: [], ("got list ([])", "gradguard.Guard")),
    ],
)
def test_record_needs_a_guard(
    net: torch.nn.Module, what: str, make: Callable[[Any], object], words: tuple[str, ...]
) -> None:
    """``testing.record`` given anything but a Guard is a TypeError at the call, not at ``with``."""
    opt = gradguard.guard(torch.optim.SGD(net.parameters(), lr=0.1), model=net)
    try:
        with pytest.raises(TypeError) as exc:
            gradguard.testing.record(make(opt))
        for word in words:
            assert word in str(exc.value)
    finally:
        gradguard.unguard(opt)


def test_a_rejected_guard_leaves_the_existing_guard_as_it_was(net: torch.nn.Module) -> None:
    """A second, bad guard() of a guarded optimizer raises and the first guard keeps working."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with gradguard.guarding(opt, model=net, mode="log") as g:
        with pytest.raises(ValueError, match="got 0"):
            gradguard.guard(opt, accumulation_steps=0)
        assert gradguard.guard_of(opt) is g
        assert len(opt._optimizer_step_pre_hooks) == 1
        for b in batches(2):
            loss_of(net, b).backward()
            opt.zero_grad()  # the bug: the backward just before was for nothing
            opt.step()
    assert [f.code for f in g.findings] == ["GG102"]


# -- install ----------------------------------------------------------------------------


# Paths are relative: the test runs in its own directory.
INSTALL = _rows(
    ({"mode": None}, TypeError, ("got None", "mode", SETTINGS)),
    ({"mode": 5}, TypeError, ("got 5", "mode", SETTINGS)),
    ({"mode": "loud"}, ValueError, ("got 'loud'", "mode", SETTINGS)),
    ({"mode": "STRICT"}, ValueError, ("got 'STRICT'", "mode", SETTINGS)),
    ({"ignore": 5}, TypeError, ("got 5", "ignore", CODES)),
    ({"ignore": ["GG999"]}, ValueError, ("'GG999'", "ignore", "known codes: GG101")),
    ({"log_json": 3}, TypeError, ("got 3", "log_json", "str or os.PathLike")),
    ({"log_json": b"x.jsonl"}, TypeError, ("b'x.jsonl'", "log_json", "str or os.PathLike")),
    ({"log_json": ""}, ValueError, ("got ''", "log_json", "non-empty file path")),
    ({"log_json": "no/x.jsonl"}, ValueError, ("got 'no/x.jsonl'", "log_json", "existing dir")),
    ({"log_json": "."}, ValueError, ("got '.'", "log_json", "not a directory")),
    ({"mode": "off", "log_json": 3}, TypeError, ("got 3", "log_json", "os.PathLike")),
    ({"record_norms": 1}, TypeError, ("got 1", "record_norms", "True or False")),
    ({"record_norms": True}, ValueError, ("record_norms=True", "log_json=PATH")),
    ({"accumulation_steps": 0}, ValueError, ("got 0", "accumulation_steps", "positive int")),
    ({"check_numerics": "no"}, TypeError, ("got 'no'", "check_numerics", "True or False")),
    ({"explode_factor": 1}, ValueError, ("got 1", "explode_factor", "above 1")),
    ({"max_grad_norm": -1.0}, ValueError, ("got -1.0", "max_grad_norm", "above 0")),
    ({"unused_after": None}, TypeError, ("got None", "unused_after", "positive int")),
    ({"numerics_every": 0}, ValueError, ("got 0", "numerics_every", "positive int")),
    ({"check_ranks_every": "2"}, TypeError, ("got '2'", "check_ranks_every", "positive int")),
)


@pytest.mark.parametrize("row", INSTALL, ids=str)
def test_install_arguments_leave_the_running_session_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, row: Row
) -> None:
    """A bad install() raises naming the value; the session already running goes on as it was."""
    monkeypatch.chdir(tmp_path)
    gradguard.install(mode="strict", log_json="running.jsonl")
    running = _session._SESSIONS.installed
    try:
        with pytest.raises(row.error) as exc:
            gradguard.install(**row.kwargs)
        _assert_says(exc, row)
        assert _session._SESSIONS.installed is running
        assert running is not None
        assert running.active
        assert running.log_path == "running.jsonl"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["running.jsonl"]
        with pytest.raises(gradguard.ClearedBeforeStepError):  # still strict, still guarding
            train(bug=True)
    finally:
        gradguard.uninstall()
    assert '"code": "GG102"' in (tmp_path / "running.jsonl").read_text()


# -- the same value, the same words, wherever it comes from ---------------------------


def _python(tmp_path: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_bad_mode_reads_the_same_from_every_source(
    pytester: pytest.Pytester, cli_results: dict[str, subprocess.CompletedProcess[str]]
) -> None:
    """install(), --mode, GRADGUARD and --gradguard all say 'X must be one of ...; got 'loud''."""
    tail = f"must be one of {SETTINGS}; got 'loud'"
    with pytest.raises(ValueError, match="loud") as exc:
        gradguard.install(mode="loud")
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = pytester.runpytest_inprocess(
        *_plugin_args(), "-p", "no:cacheprovider", "--gradguard=loud"
    )
    messages = {
        "install": str(exc.value),
        "--mode": cli_results["run --mode loud t.py"].stderr.strip(),
        "GRADGUARD": cli_results["run t.py GRADGUARD=loud"].stderr.strip(),
        "--gradguard": result.stderr.str().strip(),
    }
    assert messages == {
        "install": f"mode {tail}",
        "--mode": f"gradguard run: error: --mode {tail}",
        "GRADGUARD": f"gradguard run: error: the GRADGUARD environment variable {tail}",
        "--gradguard": f"ERROR: gradguard: the --gradguard option {tail}",
    }


# -- the command line -----------------------------------------------------------------

LOG = '{"code": "GG102", "event": "cleared-before-step", "level": "warning", "step": 1}\n'
CLI: list[tuple[list[str], dict[str, str], tuple[str, ...]]] = [
    (["run", "--mode", "loud", "t.py"], {}, ("--mode", "'loud'", SETTINGS)),
    (["run", "--mode"], {}, ("--mode", "expected one argument")),
    (["run", "t.py"], {"GRADGUARD": "loud"}, ("the GRADGUARD environment variable", "'loud'")),
    (["run", "t.py"], {"GRADGUARD": "1"}, ("the GRADGUARD environment variable", "'1'", SETTINGS)),
    (["run", "--ignore", "GG999", "t.py"], {}, ("--ignore", "'GG999'", "known codes: GG101")),
    (["run", "--ignore", "101", "t.py"], {}, ("--ignore", "'101'", "known codes: GG101")),
    (["run", "--log-json", "no/dir/x.jsonl", "t.py"], {}, ("--log-json", "'no/dir'", "existing")),
    (["run", "--log-json", "d", "t.py"], {}, ("--log-json", "got 'd'", "not a directory")),
    (["run", "--log-json", "", "t.py"], {}, ("--log-json", "got ''", "non-empty file path")),
    (["run", "--log-json"], {}, ("--log-json", "expected one argument")),
    (["run", "--record-norms", "t.py"], {}, ("--record-norms", "needs --log-json PATH")),
    (["run", "--verbose=yes", "t.py"], {}, ("--verbose", "'yes'")),
    (["run", "--loud", "t.py"], {}, ("unrecognized arguments: --loud",)),
    (["run"], {}, ("give a script to run, or -m module",)),
    (["run", "-m"], {}, ("-m", "expected one argument")),
    (["run", "missing.py"], {}, ("can't open file", "missing.py")),
    (["bogus"], {}, ("'bogus'", "'run'", "'report'")),
    (["report"], {}, ("report", "PATH")),
    (["report", "missing.jsonl"], {}, ("no such file", "'missing.jsonl'")),
    (["report", "run-*.jsonl"], {}, ("no file matches", "'run-*.jsonl'")),
    (["report", "d"], {}, ("'d' is a directory", "'d/*.jsonl'")),
    (["report", "--loud", "log.jsonl"], {}, ("unrecognized arguments: --loud",)),
    (["report", "log.jsonl", "--plot"], {}, ("--plot", "expected one argument")),
    (["report", "log.jsonl", "--plot", ""], {}, ("--plot", "got ''", "timeline.png")),
    (["report", "log.jsonl", "--plot", "d"], {}, ("--plot", "got 'd'", "not a directory")),
    (["report", "log.jsonl", "--plot", "no/t.png"], {}, ("--plot", "got 'no/t.png'", "existing")),
]


CLI_IDS = [" ".join(a) + "".join(f" {k}={v}" for k, v in e.items()) for a, e, _ in CLI]


@pytest.fixture(scope="module")
def cli_results(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, subprocess.CompletedProcess[str]]:
    """Every row of `CLI` run as ``python -m gradguard ...``, each in a directory of its own.

    The runs go a few at a time: each one starts an interpreter that imports torch.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("GRADGUARD", "RANK")}
    path = os.environ.get("PYTHONPATH")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + path if path else "")

    def run(row: int) -> subprocess.CompletedProcess[str]:
        argv, extra, _ = CLI[row]
        where = tmp_path_factory.mktemp("cli")
        (where / "t.py").write_text("print('trained')\n")
        (where / "log.jsonl").write_text(LOG)
        (where / "d").mkdir()
        proc = _python(where, "-m", "gradguard", *argv, env={**env, **extra})
        assert not (where / "d" / "t.png").exists()
        return proc

    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return dict(zip(CLI_IDS, pool.map(run, range(len(CLI))), strict=True))


@pytest.mark.parametrize(
    ("row", "words"), [(i, w) for i, (_, _, w) in zip(CLI_IDS, CLI, strict=True)], ids=CLI_IDS
)
def test_command_line(
    cli_results: dict[str, subprocess.CompletedProcess[str]], row: str, words: tuple[str, ...]
) -> None:
    """A bad flag, value or path exits 2 with one line on stderr saying what is wrong."""
    proc = cli_results[row]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    (line,) = proc.stderr.splitlines()
    for word in words:
        assert word in line
    assert proc.stdout == ""


@pytest.mark.parametrize(
    ("record", "says"),
    [
        ({"step": "x"}, "\"step\" must be an integer; got 'x'"),
        ({"params": 5}, '"params" must be a list of strings; got 5'),
        ({"params": [1]}, '"params" must be a list of strings; got [1]'),
        ({"location": None}, '"location" must be a string; got None'),
        ({"timestamp": 5}, '"timestamp" must be a string; got 5'),
        ({"rank": "0"}, "\"rank\" must be an integer; got '0'"),
        ({"event": "summary", "counts": []}, '"counts" must be an object of code: count; got []'),
        (
            {"event": "summary", "counts": {"GG102": "3"}},
            "\"counts\" must be an object of code: count; got {'GG102': '3'}",
        ),
        ({"event": "norms", "step": "x"}, "\"step\" must be an integer; got 'x'"),
        (
            {"event": "norms", "step": 1, "total": "big"},
            "\"total\" must be a number or null; got 'big'",
        ),
        (
            {"event": "norms", "step": 1, "modules": 5},
            '"modules" must be an object of module name: number or null; got 5',
        ),
        ({"event": "summary"}, 'no "counts" field'),
    ],
)
def test_a_wrongly_typed_record_is_skipped_and_named(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    record: dict[str, object],
    says: str,
) -> None:
    """A record with a field of the wrong type is skipped with a note naming line, field and value.

    The rest of the log is reported, and plotted, as if the line were not there.
    """
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    base = {"code": "GG102", "event": "cleared-before-step", "level": "warning", "step": 1}
    norms = {"event": "norms", "optimizer": "SGD#0", "step": 1, "total": 1.5, "modules": {}}
    bad = record if "event" in record else {**base, **record}
    Path("log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (base, norms, bad)))
    assert main(["report", "log.jsonl", "--plot", "t.png"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.startswith("gradguard: 1 finding in log.jsonl\n")
    note = f"note: log.jsonl: skipped 1 line that is not a gradguard record (line 3: {says})"
    assert note in out.splitlines()
    assert Path("t.png").stat().st_size > 0


# -- the pytest plugin ----------------------------------------------------------------

PYTEST_OPTIONS: list[tuple[str, list[str], dict[str, str], tuple[str, ...]]] = [
    ("", ["--gradguard=loud"], {}, ("the --gradguard option", "got 'loud'", SETTINGS)),
    ("", [], {"GRADGUARD": "loud"}, ("the GRADGUARD environment variable", "got 'loud'")),
    ("gradguard = loud", [], {}, ("ini option gradguard", "got 'loud'", SETTINGS)),
    (
        "",
        ["--gradguard=strict", "--gradguard-ignore=GG999"],
        {},
        ("the --gradguard-ignore option", "'GG999'", "known codes: GG101"),
    ),
    ("", ["--gradguard-ignore=GG1"], {}, ("the --gradguard-ignore option", "'GG1'", "GG101")),
    ("gradguard_ignore = 5", [], {}, ("ini option gradguard_ignore", "'5'", "known codes")),
    ("", ["--gradguard-log-json="], {}, ("the --gradguard-log-json option", "got ''")),
    ("", ["--gradguard-log-json=d"], {}, ("the --gradguard-log-json option", "got 'd'")),
    (
        "gradguard_log_json = no/gg.jsonl",
        [],
        {},
        ("ini option gradguard_log_json", "no/gg.jsonl'", "existing directory"),
    ),
    (
        "",
        ["--gradguard-accumulation-steps=0"],
        {},
        ("the --gradguard-accumulation-steps option", "got 0", "positive int"),
    ),
    ("gradguard_unused_after = x", [], {}, ("ini option gradguard_unused_after", "got 'x'")),
    (
        "",
        [],
        {"GRADGUARD_MAX_GRAD_NORM": "-1"},
        ("the GRADGUARD_MAX_GRAD_NORM environment variable", "got -1.0", "above 0"),
    ),
    (
        "",
        ["--gradguard-record-norms"],
        {},
        ("the --gradguard-record-norms option", "needs --gradguard-log-json PATH"),
    ),
]


@pytest.mark.parametrize(
    ("ini", "args", "env", "words"),
    PYTEST_OPTIONS,
    ids=[" ".join([i, *a, *e]) for i, a, e, _ in PYTEST_OPTIONS],
)
def test_pytest_options(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    ini: str,
    args: list[str],
    env: dict[str, str],
    words: tuple[str, ...],
) -> None:
    """A bad option, environment variable or ini value is a usage error naming it, on one line."""
    monkeypatch.delenv("GRADGUARD", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if ini:
        pytester.makeini(f"[pytest]\n{ini}\n")
    pytester.mkdir("d")
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = pytester.runpytest_inprocess(*_plugin_args(), "-p", "no:cacheprovider", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = [line for line in result.stderr.lines if line.strip()]
    assert len(errors) == 1, errors
    assert errors[0].startswith("ERROR: gradguard: ")
    for word in words:
        assert word in errors[0]
    assert "Traceback" not in result.stderr.str() + result.stdout.str()


MARKERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "mode='loud'",
        ("@pytest.mark.gradguard(mode=...) on", "::test_marked", "got 'loud'", SETTINGS),
    ),
    ("mode=5", ("@pytest.mark.gradguard(mode=...) on", "got 5", SETTINGS)),
    ("'loud'", ("@pytest.mark.gradguard(mode=...) on", "got 'loud'")),
    ("ignore=5", ("@pytest.mark.gradguard(ignore=...) on", "got 5", CODES)),
    ("ignore=['GG999']", ("@pytest.mark.gradguard(ignore=...) on", "'GG999'", "known codes")),
    ("ignore=[101]", ("@pytest.mark.gradguard(ignore=...) on", "got 101", "as str")),
    ("mod='strict'", ("@pytest.mark.gradguard on", "has no option 'mod'", "accumulation_steps")),
    ("log_json='x'", ("@pytest.mark.gradguard on", "has no option 'log_json'")),
    (
        "accumulation_steps=0",
        ("@pytest.mark.gradguard(accumulation_steps=...) on", "got 0", "positive int"),
    ),
    ("check_numerics='no'", ("@pytest.mark.gradguard(check_numerics=...) on", "True or False")),
]


@pytest.mark.parametrize(("marker", "words"), MARKERS, ids=[m for m, _ in MARKERS])
def test_marker_arguments(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, marker: str, words: tuple[str, ...]
) -> None:
    """A bad marker argument fails its test alone, naming the marker, the value and the choices."""
    monkeypatch.delenv("GRADGUARD", raising=False)
    pytester.makepyfile(
        "import pytest\n\n"
        f"@pytest.mark.gradguard({marker})\n"
        "def test_marked():\n    pass\n\n"
        "def test_other():\n    pass\n"
    )
    result = pytester.runpytest_inprocess(*_plugin_args(), "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    (line,) = [line for line in result.stdout.lines if line.startswith("gradguard: ")]
    for word in words:
        assert word in line
    assert "Traceback" not in result.stdout.str()
    assert "During handling" not in result.stdout.str()


@pytest.mark.parametrize(
    ("code", "words"),
    [
        ("5", ("TypeError: gradguard_findings.pop(code) must hold finding codes as str; got 5",)),
        (
            "'GG999'",
            ("ValueError: gradguard_findings.pop(code) names unknown finding code 'GG999'",),
        ),
    ],
)
def test_findings_fixture_pop(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, code: str, words: tuple[str, ...]
) -> None:
    """``gradguard_findings.pop`` given what is not a finding code says so, not "not recorded"."""
    monkeypatch.delenv("GRADGUARD", raising=False)
    pytester.makepyfile(f"def test_pop(gradguard_findings):\n    gradguard_findings.pop({code})\n")
    result = pytester.runpytest_inprocess(*_plugin_args(), "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    for word in words:
        assert any(word in line for line in result.stdout.lines), word
