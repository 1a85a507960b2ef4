"""Faults injected around gradguard (files, streams, the user's pipeline): the job never notices.

Each test injects one real fault (``/dev/full``, a reader gone from a pipe,
a directory removed, a file-size limit, a closed or missing stderr, a
structlog processor that raises) and checks what the user sees: the
script's exit code and stdout as without the fault, every finding still
reported, and one line on stderr saying what was lost. The README's
Reliability table lists them.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import structlog
import torch
from conftest import child_env
from loops import BUGGY_SCRIPT, CORRECT_SCRIPT, train
from test_pytest_plugin import LOOPS, _run

import gradguard
from gradguard.cli import main

FULL = "/dev/full"
pytestmark = pytest.mark.skipif(not os.path.exists(FULL), reason="needs Linux's /dev/full")


@pytest.fixture(autouse=True)
def _uninstall() -> Iterator[None]:
    yield
    gradguard.uninstall()


def lost_lines(err: str) -> list[str]:
    """The lines of ``err`` that say a log lost records."""
    return [line for line in err.splitlines() if "; training was not affected" in line]


def _python(
    args: list[str],
    cwd: Path,
    stderr: int | None = subprocess.PIPE,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )


# -- a log that cannot be written ------------------------------------------------


def _without_times(err: str) -> str:
    """``err`` without the console's ``HH:MM:SS`` stamps, which differ between two runs."""
    return re.sub(r"^\d\d:\d\d:\d\d ", "", err, flags=re.MULTILINE)


@pytest.mark.parametrize(
    ("mode", "script", "norms"),
    [
        ("warn", "buggy", False),
        ("strict", "buggy", False),
        ("log", "buggy", True),  # the first record fails, then the summary
        ("log", "correct", True),  # the first norms batch fails, at close
    ],
)
def test_a_full_disk_changes_nothing_under_gradguard_run_but_one_line(
    mode: str, script: str, norms: bool, tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    """``--log-json /dev/full``: exit code, stdout and stderr as with no log, plus one line."""
    (tmp_path / "train.py").write_text(BUGGY_SCRIPT if script == "buggy" else CORRECT_SCRIPT)
    base = ["-m", "gradguard", "run", "--mode", mode, "--verbose"]
    args = [*base, *(["--record-norms"] if norms else []), "--log-json", FULL, "train.py"]
    with ThreadPoolExecutor(2) as pool:  # two runs at once: each is mostly torch's import
        plain_run = pool.submit(_python, [*base, "train.py"], tmp_path)
        full = _python(args, tmp_path)
        plain = plain_run.result()
    assert (full.returncode, full.stdout) == (plain.returncode, plain.stdout)
    assert (plain.returncode, plain.stdout) == ((1, "") if mode == "strict" else (0, "trained\n"))
    (line,) = lost_lines(full.stderr)
    # The buggy loop clears between backward and step: recorded, its steps' norms say so.
    buggy = "1 finding, 3 steps' norms and the summary" if norms else "1 finding and the summary"
    lost = {"buggy": buggy, "correct": "2 steps' norms"}[script]
    assert line == (
        "gradguard: could not write the JSON log /dev/full (OSError: [Errno 28] No space left "
        f"on device); lost: {lost}; training was not affected"
    )
    others = [text for text in full.stderr.splitlines(keepends=True) if text != line + "\n"]
    assert _without_times("".join(others)) == _without_times(plain.stderr)


@contextlib.contextmanager
def log_reader(path: Path) -> Iterator[Callable[[], bytes]]:
    """A FIFO at ``path`` with a reader: the log works until ``close()`` makes writes fail."""
    os.mkfifo(path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    closed = False

    def close() -> bytes:
        nonlocal closed
        try:
            data = os.read(fd, 1 << 20)
        except BlockingIOError:  # nothing written yet
            data = b""
        os.close(fd)
        closed = True
        return data

    try:
        yield close
    finally:
        if not closed:
            os.close(fd)


def test_a_norms_batch_that_fails_mid_run_loses_only_the_log(tmp_path: Path, capsys) -> None:
    """The log's reader goes away mid-run: the norms batch fails, training and uninstall go on."""
    plain = [p.detach().clone() for p in train(bug=False, steps=300)[0].parameters()]
    with log_reader(tmp_path / "gg.jsonl") as close:
        gradguard.install(mode="log", log_json=tmp_path / "gg.jsonl", record_norms=True)
        close()  # nothing was written yet: the first batch goes at 256 steps
        model, _ = train(bug=False, steps=300)
        assert gradguard.uninstall() == []
    assert all(torch.equal(a, b) for a, b in zip(plain, model.parameters(), strict=True))
    # 299 steps recorded (the first is the discovery step), in batches
    assert lost_lines(capsys.readouterr().err) == [
        f"gradguard: could not write the JSON log {tmp_path / 'gg.jsonl'} (BrokenPipeError: "
        "[Errno 32] Broken pipe); lost: 299 steps' norms; training was not affected"
    ]


def test_a_summary_that_cannot_be_written_at_uninstall_is_said_once(tmp_path: Path, capsys) -> None:
    """The first finding reaches the log; the summary at ``uninstall()`` fails: said, not raised."""
    with log_reader(tmp_path / "gg.jsonl") as close:
        gradguard.install(mode="log", log_json=tmp_path / "gg.jsonl")
        train(bug=True, steps=3)
        written = close()
        rows = gradguard.uninstall()
    assert [(r.code, r.count) for r in rows] == [("GG102", 3)]
    assert written.decode().count("\n") == 1
    assert b'"code": "GG102"' in written
    err = capsys.readouterr().err
    (line,) = lost_lines(err)
    assert line.endswith(
        "(BrokenPipeError: [Errno 32] Broken pipe); lost: the summary; training was not affected"
    )
    assert "gradguard: 3 findings (mode=log)" in err


def test_a_full_disk_at_interpreter_exit_keeps_the_exit_code(
    tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    """``install(log_json="/dev/full")`` with no ``uninstall()``: the summary at exit, exit 0."""
    script = tmp_path / "train.py"
    script.write_text(
        f"import gradguard\ngradguard.install(mode='log', log_json={FULL!r})\n{BUGGY_SCRIPT}"
    )
    proc = _python([str(script)], tmp_path)
    assert (proc.returncode, proc.stdout) == (0, "trained\n"), proc.stderr
    (line,) = lost_lines(proc.stderr)
    assert "could not write the JSON log /dev/full (OSError: [Errno 28]" in line
    assert "lost: 1 finding and the summary;" in line
    assert "gradguard: 3 findings (mode=log)" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("fault", ["removed", "read-only"])
def test_a_log_directory_changed_mid_run(fault: str, tmp_path: Path, capsys) -> None:
    """A directory removed under the log loses its records, said once; a read-only one, none."""
    directory = tmp_path / "logs"
    directory.mkdir()
    gradguard.install(mode="log", log_json=directory / "gg.jsonl")
    train(bug=True, steps=2)
    if fault == "removed":
        shutil.rmtree(directory)
    else:
        directory.chmod(0o500)
    train(bug=True, steps=2)
    rows = gradguard.uninstall()
    assert [(r.code, r.count) for r in rows] == [("GG102", 4)]
    lines = lost_lines(capsys.readouterr().err)
    if fault == "removed":
        assert lines == [
            f"gradguard: the JSON log {directory / 'gg.jsonl'} was removed while gradguard "
            "wrote it; lost: 2 findings and the summary; training was not affected"
        ]
    else:
        directory.chmod(0o700)
        assert lines == []
        text = (directory / "gg.jsonl").read_text()
        assert text.count('"code": "GG102"') == 2
        assert text.splitlines()[-1].startswith('{"event": "summary", "counts": {"GG102": 4}')


CHILD_ON_A_FULL_DISK = f"""\
import resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))  # this process can write no file
{BUGGY_SCRIPT}"""


def test_a_followed_child_that_cannot_write_its_report_fails_nothing(
    tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    """A child under ``gradguard run`` whose file writes fail trains and exits as it would."""
    (tmp_path / "child.py").write_text(CHILD_ON_A_FULL_DISK)
    (tmp_path / "parent.py").write_text(
        "import subprocess, sys\n"
        "proc = subprocess.run([sys.executable, 'child.py'])\n"
        "print('child exited', proc.returncode)\n"
    )
    proc = _python(["-m", "gradguard", "run", "--mode", "log", "parent.py"], tmp_path)
    assert (proc.returncode, proc.stdout) == (0, "trained\nchild exited 0\n"), proc.stderr
    (line,) = lost_lines(proc.stderr)
    assert re.fullmatch(
        r"gradguard: could not write process \d+'s report to the run that started it \(.*\) "
        r"\(OSError: \[Errno 27\] File too large\); lost: 1 finding, the summary and 1 other "
        r"record; training was not affected",
        line,
    )
    assert "cleared-before-step" in proc.stderr  # its findings still reached its stderr


def test_the_pytest_plugins_log_on_a_full_disk_fails_no_test(pytester: pytest.Pytester) -> None:
    """``--gradguard-log-json /dev/full``: the run's outcome and exit code stay, one line said."""
    pytester.makepyfile(LOOPS + "\n\ndef test_buggy():\n    train(bug=True)\n")
    result = _run(pytester, "--gradguard=warn", f"--gradguard-log-json={FULL}")
    result.assert_outcomes(passed=1, warnings=1)
    assert result.ret == pytest.ExitCode.OK
    assert lost_lines(result.stderr.str()) == [
        "gradguard: could not write the JSON log /dev/full (OSError: [Errno 28] No space left "
        "on device); lost: 1 finding and the summary; training was not affected"
    ]
    assert "sink-error" not in result.stdout.str()


def test_a_log_that_cannot_be_created_is_a_value_error_naming_it() -> None:
    """``install(log_json=...)`` on a path the system refuses raises ValueError naming the path."""
    with pytest.raises(ValueError, match=r"log_json='/proc/gg.jsonl' cannot be created: "):
        gradguard.install(log_json="/proc/gg.jsonl")


def test_a_log_that_cannot_be_created_is_a_usage_error_of_the_plugin(
    pytester: pytest.Pytester,
) -> None:
    """``--gradguard-log-json`` on a path the system refuses: pytest's usage error naming it."""
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = _run(pytester, "--gradguard=warn", "--gradguard-log-json=/proc/gg.jsonl")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["ERROR: gradguard: the --gradguard-log-json option='/proc/gg.jsonl' cannot be created: *"]
    )


@pytest.mark.usefixtures("isolated_sys")
def test_a_log_that_cannot_be_created_is_a_usage_error_of_the_runner(
    tmp_path: Path, capsys
) -> None:
    """``gradguard run --log-json`` on a path the system refuses: exit 2 naming the option."""
    (tmp_path / "train.py").write_text(BUGGY_SCRIPT)
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--log-json", "/proc/gg.jsonl", str(tmp_path / "train.py")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith(
        "gradguard run: error: --log-json='/proc/gg.jsonl' cannot be created: FileNotFoundError"
    )


# -- a stderr that cannot be written ---------------------------------------------

STDERR_FAULTS = ("no stderr", "closed sys.stderr", "broken pipe")


def _under_stderr_fault(
    fault: str, args: list[str], cwd: Path, env: dict[str, str] | None = None
) -> tuple[int, str]:
    """Run python ``args`` with stderr missing (``2>&-``), closed by the script, or a dead pipe."""
    if fault == "no stderr":
        proc = subprocess.run(
            ["sh", "-c", 'exec "$0" "$@" 2>&-', sys.executable, *args],
            stdout=subprocess.PIPE,
            text=True,
            cwd=cwd,
            env=env,
            timeout=120,
        )
    elif fault == "closed sys.stderr":  # the script closes it first thing (see _script)
        proc = _python(args, cwd, env=env)
    else:
        read, write = os.pipe()
        os.close(read)  # every write to stderr fails with EPIPE
        try:
            proc = _python(args, cwd, stderr=write, env=env)
        finally:
            os.close(write)
    return proc.returncode, proc.stdout


def _script(fault: str, body: str) -> str:
    return ("import sys\nsys.stderr.close()\n" if fault == "closed sys.stderr" else "") + body


HOWS = [("plain", None), ("run", "warn"), ("run", "strict"), ("install", "log")]
StderrRun = tuple[tuple[int, str], Path]


def _stderr_case(
    fault: str, how: str, mode: str | None, root: Path, env: dict[str, str]
) -> StderrRun:
    """Run the buggy script under ``fault``: plainly, under ``gradguard run`` or ``install()``."""
    root.mkdir()
    log = root / "gg.jsonl"
    args = ["train.py"]
    body = BUGGY_SCRIPT
    if how == "run":
        args = ["-m", "gradguard", "run", "--mode", str(mode), "--log-json", str(log), "train.py"]
    elif how == "install":
        body = f"import gradguard\ngradguard.install(mode={mode!r}, log_json={str(log)!r})\n" + body
    (root / "train.py").write_text(_script(fault, body))
    return _under_stderr_fault(fault, args, root, env), log


@pytest.fixture(scope="module")
def stderr_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, ...], StderrRun]:
    """Every fault under every way of running, started together: each is mostly torch's import."""
    env = child_env()
    base = tmp_path_factory.mktemp("stderr")
    cases = [(fault, how, str(mode)) for fault in STDERR_FAULTS for how, mode in HOWS]
    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        futures = {
            case: pool.submit(
                _stderr_case,
                *case[:2],
                None if case[1] == "plain" else case[2],
                base / "-".join(case).replace(" ", "_"),
                env,
            )
            for case in cases
        }
        return {case: future.result() for case, future in futures.items()}


@pytest.mark.parametrize("fault", STDERR_FAULTS)
def test_plain_python_trains_under_each_stderr_fault(
    fault: str, stderr_runs: dict[tuple[str, ...], StderrRun]
) -> None:
    """The baseline: without gradguard the buggy script exits 0 and prints ``trained``."""
    assert stderr_runs[fault, "plain", "None"][0] == (0, "trained\n")


@pytest.mark.parametrize("fault", STDERR_FAULTS)
@pytest.mark.parametrize(("how", "mode"), HOWS[1:])
def test_a_stderr_that_cannot_be_written_changes_nothing(
    fault: str, how: str, mode: str, stderr_runs: dict[tuple[str, ...], StderrRun]
) -> None:
    """Findings, the summary and the lost-log line go nowhere; exit code, stdout, log stay."""
    result, log = stderr_runs[fault, how, mode]
    expected = (1, "") if mode == "strict" else (0, "trained\n")  # as with a working stderr
    assert result == expected
    records = log.read_text().splitlines()
    assert '"code": "GG102"' in records[0]
    assert records[-1].startswith('{"event": "summary", "counts": {"GG102": ')


# -- a structlog pipeline that raises --------------------------------------------


def _broken(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    raise ValueError("the user's processor is broken")


BROKEN_LINE = re.compile(
    r"gradguard: your structlog configuration raised ValueError: the user's processor is "
    r"broken at .*test_faults\.py:\d+ on gradguard's 'cleared-before-step' event; gradguard "
    r"writes the events it cannot take to stderr instead; training continues unchanged"
)


def _plain_findings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("gradguard: GG102 ")]


def test_a_raising_pipeline_in_log_mode_loses_no_finding(capsys) -> None:
    """Each finding reaches stderr as a plain line, the failure is said once, guards stay on."""
    structlog.configure(processors=[_broken])
    gradguard.install(mode="log")
    train(bug=True)
    train(bug=True)  # a second optimizer: a second finding through the broken pipeline
    rows = gradguard.uninstall()
    assert [(r.code, r.count) for r in rows] == [("GG102", 6)]  # every step judged
    err = capsys.readouterr().err
    assert [bool(BROKEN_LINE.fullmatch(line)) for line in err.splitlines()].count(True) == 1
    plain = _plain_findings(err)
    assert [re.search(r"of SGD#\d+", line) is not None for line in plain] == [True, True]
    assert "internal-error" not in err
    assert "gradguard: 6 findings (mode=log)" in err


def test_a_raising_pipeline_in_warn_mode_still_warns(capsys) -> None:
    """The warning is issued as usual, with the plain line and the failure said once."""
    structlog.configure(processors=[_broken])
    gradguard.install(mode="warn")
    with pytest.warns(gradguard.ClearedBeforeStepWarning, match="GG102"):
        train(bug=True)
    assert [(r.code, r.count) for r in gradguard.uninstall()] == [("GG102", 3)]
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if BROKEN_LINE.fullmatch(line)] != []
    assert len(_plain_findings(err)) == 1
    assert "internal-error" not in err


def test_a_raising_pipeline_in_strict_mode_raises_the_finding(capsys) -> None:
    """Strict mode raises the finding's own error, not GradGuardInternalError."""
    structlog.configure(processors=[_broken])
    gradguard.install(mode="strict")
    with pytest.raises(gradguard.ClearedBeforeStepError, match="GG102") as info:
        train(bug=True)
    assert not isinstance(info.value, gradguard.GradGuardInternalError)
    assert info.value.finding is not None
    assert info.value.finding.code == "GG102"
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if BROKEN_LINE.fullmatch(line)]) == 1
    assert len(_plain_findings(err)) == 1
    assert "please report" not in err


def test_a_raising_pipeline_under_gradguard_run_keeps_the_exit_code(
    tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    """A script whose own structlog setup raises: exit 0, stdout, the finding and the summary."""
    (tmp_path / "train.py").write_text(
        "import structlog\n\n"
        "def broken(logger, method, event):\n"
        '    raise ValueError("the user\'s processor is broken")\n\n'
        "structlog.configure(processors=[broken])\n" + BUGGY_SCRIPT
    )
    proc = _python(["-m", "gradguard", "run", "--mode", "log", "train.py"], tmp_path)
    assert (proc.returncode, proc.stdout) == (0, "trained\n"), proc.stderr
    assert proc.stderr.count("your structlog configuration raised ValueError") == 1
    assert "train.py:4 on gradguard's 'cleared-before-step' event" in proc.stderr
    assert len(_plain_findings(proc.stderr)) == 1
    assert "gradguard: 3 findings (mode=log)" in proc.stderr
