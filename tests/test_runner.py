"""``gradguard run``: guard a script or module from the command line, with no code change."""

from __future__ import annotations

import contextlib
import io
import json
import os
import runpy
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import ROOT, child_env
from loops import BUGGY_SCRIPT, CORRECT_SCRIPT
from test_logs import FIELDS as JSON_FIELDS

from gradguard._session import NOTHING_STEPPED
from gradguard.cli import main

FLAGSHIP = "examples/tutorial_loop.py"
UNGUARDED = "examples/tutorial_loop_unguarded.py"

# Prints how it was started, then fails the way its first argument asks.
PROBE = """\
import sys
print(__name__, __file__, sys.argv, sys.path[0])
if sys.argv[1:2] == ["raise"]:
    raise ValueError("the script's own error")
if sys.argv[1:2] == ["exit"]:
    sys.exit(3)
"""


def _python(
    *args: str, cwd: Path = ROOT, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=120, env=env
    )


@pytest.fixture(scope="module")
def tutorial_stdout() -> str:
    """What the tutorial loop prints without gradguard (torch is seeded, so it is reproducible)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        runpy.run_path(str(ROOT / UNGUARDED), run_name="__main__")
    return out.getvalue()


def test_strict_flagship_exits_nonzero_with_the_finding_last(
    subprocess_env: dict[str, str],
) -> None:
    """Strict mode stops the flagship example at GG102 and its message is stderr's last line."""
    proc = _python("-m", "gradguard", "run", "--mode", "strict", FLAGSHIP)
    assert proc.returncode == 1
    assert proc.stdout == ""
    last = proc.stderr.rstrip("\n").splitlines()[-1]
    assert last.startswith("GG102 cleared-before-step: ")
    assert last.endswith("never clear between backward() and step(). See docs/findings/GG102.md.")
    assert f'File "{ROOT / FLAGSHIP}", line 34, in <module>' in proc.stderr


def test_log_mode_writes_the_json_line_and_leaves_stdout_alone(
    tmp_path: Path, subprocess_env: dict[str, str], tutorial_stdout: str
) -> None:
    """--mode log --log-json exits 0 and writes the GG102 record; the script's stdout is intact."""
    out = tmp_path / "out.jsonl"
    proc = _python("-m", "gradguard", "run", "--mode", "log", "--log-json", str(out), FLAGSHIP)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == tutorial_stdout
    record, summary = [json.loads(line) for line in out.read_text().splitlines()]
    assert set(record) == JSON_FIELDS | {"written_at", "cleared_at"}
    assert (summary["event"], summary["counts"]) == ("summary", {"GG102": 100})
    assert (record["code"], record["step"], record["location"]) == ("GG102", 1, f"{FLAGSHIP}:34")
    assert (record["written_at"], record["cleared_at"]) == (f"{FLAGSHIP}:32", f"{FLAGSHIP}:33")
    assert record["params"] == ["linear.weight", "linear.bias"]


def test_unguarded_tutorial_gives_the_same_finding(
    subprocess_env: dict[str, str], tutorial_stdout: str
) -> None:
    """The tutorial loop with no gradguard line gets GG102 under the runner, with a summary."""
    proc = _python("-m", "gradguard", "run", UNGUARDED)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == tutorial_stdout
    assert f"{UNGUARDED}:33: ClearedBeforeStepWarning: GG102 cleared-before-step" in proc.stderr
    assert "params [linear.weight, linear.bias]" in proc.stderr
    summary = proc.stderr[proc.stderr.index("gradguard: 100 findings (mode=warn)") :]
    header, row, lines, lines_continued, fix = summary.splitlines()[1:6]
    assert header.split("  ")[0] == "code"
    assert row.split() == [
        "GG102",
        "cleared-before-step",
        "100",
        "1",
        f"{UNGUARDED}:33",
        "linear.weight,",
        "linear.bias",
    ]
    told = " ".join([lines, lines_continued]).split()
    assert " ".join(told) == (
        f"lines: backward() at {UNGUARDED}:31 wrote them, optimizer.zero_grad() at line 32 "
        "cleared them, step() at line 33 applied nothing"
    )
    assert fix.strip().startswith("fix: move zero_grad() before loss.backward()")


@pytest.mark.parametrize("how", ["raise", "exit"])
def test_script_failure_is_the_same_as_under_python(
    how: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    isolated_sys: None,
) -> None:
    """A script's own exception or sys.exit(3) gives python's output, traceback and exit code.

    gradguard adds one line before them: the probe steps no optimizer.
    """
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "probe.py").write_text(PROBE)
    expected = _python("sub/probe.py", how, "--mode", "x", cwd=tmp_path)
    monkeypatch.chdir(tmp_path)
    try:
        code = main(["run", "sub/probe.py", how, "--mode", "x"])
    except SystemExit as exc:
        code = exc.code  # type: ignore[assignment]
    out, err = capsys.readouterr()
    assert (code, out) == (expected.returncode, expected.stdout)
    assert err == NOTHING_STEPPED + "\n" + expected.stderr


def test_dash_m_runs_a_module_like_python(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    isolated_sys: None,
) -> None:
    """``gradguard run -m pkg.mod args`` starts the module exactly as ``python -m`` does."""
    (tmp_path / "gg_probe_pkg").mkdir()
    (tmp_path / "gg_probe_pkg" / "__init__.py").write_text("")
    (tmp_path / "gg_probe_pkg" / "mod.py").write_text(PROBE)
    expected = _python("-m", "gg_probe_pkg.mod", "a", "-m", cwd=tmp_path)
    monkeypatch.chdir(tmp_path)
    code = main(["run", "-m", "gg_probe_pkg.mod", "a", "-m"])
    out, err = capsys.readouterr()
    assert (code, out, err) == (0, expected.stdout, NOTHING_STEPPED + "\n")


def test_correct_loop_prints_nothing_unless_verbose(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    isolated_sys: None,
) -> None:
    """A correct loop leaves stderr empty; --verbose says that nothing was found."""
    (tmp_path / "train.py").write_text(CORRECT_SCRIPT)
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--mode", "strict", "train.py"]) == 0
    assert capsys.readouterr() == ("trained\n", "")
    assert main(["run", "--mode", "strict", "--verbose", "train.py"]) == 0
    assert capsys.readouterr().err == "gradguard: no findings (mode=strict, 1 optimizer watched)\n"


def test_environment_variable_sets_the_mode_and_the_flag_wins(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    isolated_sys: None,
) -> None:
    """GRADGUARD=strict makes the runner strict, --mode wins over it, GRADGUARD=off turns it off."""
    (tmp_path / "train.py").write_text(BUGGY_SCRIPT)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GRADGUARD", "strict")
    assert main(["run", "train.py"]) == 1
    assert capsys.readouterr().err.splitlines()[-1].startswith("GG102 cleared-before-step")
    assert main(["run", "--mode", "log", "train.py"]) == 0
    assert "gradguard: 3 findings (mode=log)" in capsys.readouterr().err
    monkeypatch.setenv("GRADGUARD", "off")
    assert main(["run", "train.py"]) == 0
    assert capsys.readouterr() == ("trained\n", "")


@pytest.mark.parametrize(
    ("argv", "env", "named"),
    [
        (["run", "train.py"], "loud", "GRADGUARD environment variable"),
        (["run", "--mode", "loud", "train.py"], None, "--mode"),
        (["run", "--ignore", "GG999", "train.py"], None, "--ignore"),
        (["run", "--log-json", "no/such/dir/out.jsonl", "train.py"], None, "no/such/dir"),
        (["run"], None, "give a script"),
    ],
)
def test_bad_arguments_exit_2_naming_the_value(
    argv: list[str],
    env: str | None,
    named: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    isolated_sys: None,
) -> None:
    """A bad mode, code or log path stops the runner with exit code 2 and says which value."""
    monkeypatch.chdir(tmp_path)
    if env is not None:
        monkeypatch.setenv("GRADGUARD", env)
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert named in capsys.readouterr().err


def test_run_help_lists_its_options_and_every_mode(capsys: pytest.CaptureFixture[str]) -> None:
    """``gradguard run --help`` shows each of run's options and the modes --mode takes."""
    with pytest.raises(SystemExit) as info:
        main(["run", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--mode {warn,strict,log,off}" in out
    for option in ("--log-json PATH", "--ignore CODES", "--record-norms", "--verbose", "-m module"):
        assert option in out


DISTILL_SCRIPT = """\
import sys

import torch
import torch.nn.functional as F
from torch import nn

torch.manual_seed(0)
student = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


class LM(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 16), nn.Tanh())
        self.head = nn.Linear(16, 3, bias=False)


teacher = LM()
opt = torch.optim.SGD(student.parameters(), lr=0.05)
for step in range(30):
    x = torch.randn(16, 4)
    with torch.no_grad():
        hidden = teacher.body(x)
    weight = teacher.head.weight if sys.argv[1] == "bug" else teacher.head.weight.detach()
    teacher_logits = hidden @ weight.T  # the head applied as a raw weight
    loss = F.kl_div(
        F.log_softmax(student(x), -1), F.softmax(teacher_logits, -1), reduction="batchmean"
    )
    opt.zero_grad()
    loss.backward()
    opt.step()
"""


@pytest.mark.parametrize("variant", ["bug", "detached"])
def test_a_teacher_head_used_as_a_raw_weight(tmp_path: Path, subprocess_env, variant) -> None:
    """A teacher's head weight used outside no_grad gets gradients no optimizer applies:
    GG302 under the runner, named from the script's globals; detached, silent."""
    script = tmp_path / "distill.py"
    script.write_text(DISTILL_SCRIPT, encoding="utf-8")
    proc = _python("-m", "gradguard", "run", "--mode", "strict", str(script), variant)
    if variant == "detached":
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr == ""
    else:
        assert proc.returncode == 1
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("GG302 unoptimized-parameter:"), proc.stderr
        assert "at step 27 " in last
        assert "params [teacher.head.weight]" in last


# Scripts that fail in each way a script can end, with the files they need.
FAILING = {
    "exception": {"main.py": "def fail():\n    raise ValueError('bad batch')\n\n\nfail()\n"},
    "raised-keyboard-interrupt": {
        "main.py": "def stop():\n    raise KeyboardInterrupt\n\n\nstop()\n"
    },
    "sigint": {
        "main.py": "import os\nimport signal\n\n\ndef stop():\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n\n\nstop()\n"
    },
    "exit-with-a-message": {"main.py": "import sys\n\nsys.exit('stopped: no data in data/')\n"},
    "error-importing-a-module": {
        "main.py": "import helpers\n",
        "helpers.py": "import json\n\nCONFIG = json.loads('{')\n",
    },
    "error-under-dash-m": {
        "pkg/__init__.py": "",
        "pkg/train.py": "def fail():\n    raise ValueError('bad batch')\n\n\nfail()\n",
    },
    "keyboard-interrupt-under-dash-m": {
        "pkg/__init__.py": "",
        "pkg/train.py": "raise KeyboardInterrupt\n",
    },
    "package-import-error-under-dash-m": {
        "pkg/__init__.py": "raise ImportError('pkg needs a GPU build')\n",
        "pkg/train.py": "",
    },
    "no-such-module-under-dash-m": {"pkg/__init__.py": ""},
    "directory-with-main": {"app/__main__.py": "raise ValueError('bad batch')\n"},
}
TARGETS = {"main.py": ["main.py"], "pkg/__init__.py": ["-m", "pkg.train"]}

# pip's console-script launcher, as it installs the `gradguard` command.
LAUNCHER = """\
import re
import sys
from gradguard.cli import main
if __name__ == '__main__':
    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])
    sys.exit(main())
"""


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")


# The launcher matters where the exception leaves the runner through it: Ctrl-C.
LAUNCHES = [(case, "python -m gradguard") for case in FAILING] + [
    (case, "gradguard command")
    for case in ("raised-keyboard-interrupt", "sigint", "keyboard-interrupt-under-dash-m")
]


Runs = tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]


def _plain_and_guarded(case: str, launcher: str, root: Path, env: dict[str, str]) -> Runs:
    """The ``case`` script under python, then under ``gradguard run`` through ``launcher``."""
    root.mkdir()
    _write(root, FAILING[case])
    target = next((t for name, t in TARGETS.items() if name in FAILING[case]), ["app"])
    plain = _python(*target, cwd=root, env=env)
    if launcher == "gradguard command":
        (root / "bin").mkdir()
        (root / "bin" / "gradguard").write_text(LAUNCHER, encoding="utf-8")
        return plain, _python("bin/gradguard", "run", *target, cwd=root, env=env)
    return plain, _python("-m", "gradguard", "run", *target, cwd=root, env=env)


@pytest.fixture(scope="module")
def failing_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Runs]:
    """Every failing case's runs, started together: each is mostly torch's import."""
    env = child_env()
    base = tmp_path_factory.mktemp("failing")
    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        futures = {
            (case, launcher): pool.submit(
                _plain_and_guarded,
                case,
                launcher,
                base / f"{case}-{launcher}".replace(" ", "_"),
                env,
            )
            for case, launcher in LAUNCHES
        }
        return {key: future.result() for key, future in futures.items()}


@pytest.mark.parametrize(("case", "launcher"), LAUNCHES)
def test_a_failing_script_reads_as_under_python(
    case: str, launcher: str, failing_runs: dict[tuple[str, str], Runs]
) -> None:
    """Whatever ends the script (an exception, Ctrl-C or SIGINT, sys.exit with a message, an
    error at import, under -m or from a directory), stderr and the exit code are python's:
    the same traceback line for line, after gradguard's one summary line."""
    plain, guarded = failing_runs[case, launcher]
    assert plain.stderr, "the case must fail"
    assert guarded.stderr.splitlines() == [NOTHING_STEPPED, *plain.stderr.splitlines()]
    assert (guarded.returncode, guarded.stdout) == (plain.returncode, plain.stdout)


@pytest.mark.parametrize("how", ["raise", "os.kill"])
def test_ctrl_c_exits_as_python_does(how: str, tmp_path: Path, subprocess_env) -> None:
    """A KeyboardInterrupt the script does not catch ends the run killed by SIGINT,
    as under python (a shell shows 130); its own excepthook sees only its frames."""
    stop = "raise KeyboardInterrupt" if how == "raise" else "os.kill(os.getpid(), signal.SIGINT)"
    (tmp_path / "main.py").write_text(
        "import os\nimport signal\nimport sys\n\n\n"
        "def hook(kind, value, tb):\n"
        "    print('hook:', kind.__name__, tb.tb_frame.f_code.co_filename, file=sys.stderr)\n\n\n"
        f"sys.excepthook = hook\n{stop}\n",
        encoding="utf-8",
    )
    plain = _python("main.py", cwd=tmp_path)
    guarded = _python("-m", "gradguard", "run", "main.py", cwd=tmp_path)
    assert plain.returncode == guarded.returncode == -signal.SIGINT
    assert plain.stderr == f"hook: KeyboardInterrupt {tmp_path / 'main.py'}\n"
    assert guarded.stderr == NOTHING_STEPPED + "\n" + plain.stderr
    shell = subprocess.run(
        ["sh", "-c", f'"{sys.executable}" -m gradguard run main.py; echo "status $?"'],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert shell.stdout == "status 130\n"


STRICT_LOOP = """\
import sys

import torch
from torch import nn

if "--plain" in sys.argv:
    import gradguard

    gradguard.install(mode="strict")


def train():
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        model(torch.randn(8, 2)).pow(2).mean().backward()
        opt.zero_grad()
        opt.step()


train()
"""


def _traceback(stderr: str, end: str) -> list[str]:
    """The lines of stderr's traceback, up to the first line starting with ``end``."""
    lines = stderr.splitlines()
    lines = lines[lines.index("Traceback (most recent call last):") :]
    return lines[: next(i for i, line in enumerate(lines) if line.startswith(end))]


@pytest.mark.parametrize("target", [["train.py"], ["-m", "loops.train"]])
def test_a_strict_finding_shows_pythons_traceback_up_to_the_step(
    target: list[str], tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    """A strict finding under the runner shows the frames python shows for it (runpy's under
    -m), ending at the script's own opt.step() line, before torch's and gradguard's."""
    files = {"train.py": STRICT_LOOP, "loops/__init__.py": "", "loops/train.py": STRICT_LOOP}
    _write(tmp_path, files)
    plain = _python(*target, "--plain", cwd=tmp_path)
    guarded = _python("-m", "gradguard", "run", "--mode", "strict", *target, cwd=tmp_path)
    assert plain.returncode == guarded.returncode == 1
    torch_frame = f'  File "{Path(torch.__file__).parent}'
    frames = _traceback(plain.stderr, torch_frame)
    assert frames[-1] == "    opt.step()"
    assert _traceback(guarded.stderr, "gradguard.ClearedBeforeStepError (mode=strict") == frames


# -- zero code ------------------------------------------------------------------------

VALIDATION_LEAK = """
import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.05)
for epoch in range(2):
    model.train()
    for _ in range(3):
        x = torch.randn(8, 4)
        nn.functional.mse_loss(model(x), x[:, :1]).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    for _ in range(2):
        x = torch.randn(8, 4)
        nn.functional.mse_loss(model(x), x[:, :1]).backward()  # validation, never cleared
"""


def test_the_runner_finds_the_validation_leak_with_no_code_change(tmp_path, subprocess_env):
    """``gradguard run`` finds the model itself: the JSON record names the validation
    backward, and strict mode fails the run."""
    script, log = tmp_path / "train.py", tmp_path / "run.jsonl"
    script.write_text(VALIDATION_LEAK)
    run = ("-m", "gradguard", "run")
    logged = _python(*run, "--log-json", str(log), str(script), cwd=tmp_path, env=subprocess_env)
    assert logged.returncode == 0, logged.stderr
    (record,) = [r for r in map(json.loads, log.read_text().splitlines()) if r.get("code")]
    assert (record["code"], record["step"]) == ("GG106", 4)
    assert (record["written_at"], record["location"]) == ("train.py:18", "train.py:13")
    assert record["params"] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    strict = _python(*run, "--mode", "strict", str(script), cwd=tmp_path, env=subprocess_env)
    assert strict.returncode == 1
    assert "GG106 foreign-gradient" in strict.stderr.splitlines()[-1]
