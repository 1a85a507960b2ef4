"""``gradguard run`` follows the Python processes a script starts: their findings are the run's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, table
from loops import BUGGY_SCRIPT, LOOP_SCRIPT, step_lineno, train

import gradguard
from gradguard import _plot
from gradguard._report import load
from gradguard._session import NOTHING_STEPPED
from gradguard.cli import main

# pytorch/examples' mnist_hogwild, cut down: the model's parameters live in
# shared memory and several processes train it at once, each with its own
# optimizer: one worker per start method in argv[1], in order. Fill {clear}
# with "opt.zero_grad()" (correct) or "pass" (the bug).
HOGWILD = """\
import sys

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(8, 16)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        return self.head(torch.relu(self.encoder(x)))


def train(rank, model, steps):
    torch.manual_seed(rank)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.5)
    for _ in range(steps):
        x, y = torch.randn(16, 8), torch.randn(16, 2)
        {clear}
        F.mse_loss(model(x), y).backward()
        opt.step()


if __name__ == "__main__":
    torch.manual_seed(0)
    model = Net()
    model.share_memory()
    if sys.argv[2:] == ["--parent-trains"]:
        train(-1, model, steps=5)
    workers = [
        mp.get_context(method).Process(target=train, args=(rank, model, 5))
        for rank, method in enumerate(sys.argv[1].split(","))
    ]
    for p in workers:
        p.start()
    for p in workers:
        p.join()
    print("trained", [p.exitcode for p in workers])
"""
STEP_LINE = 1 + HOGWILD.splitlines().index("        opt.step()")
PARAMS = ["encoder.weight", "encoder.bias", "head.weight", "head.bias"]
# Several workers, with both start methods that begin a fresh interpreter.
METHODS = "spawn,forkserver,forkserver"

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX start methods")


def _run(
    args: list[str], env: dict[str, str], cwd: Path, script: str | None = None
) -> subprocess.CompletedProcess[str]:
    if script is not None:
        (cwd / "train.py").write_text(script)
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**env, "OMP_NUM_THREADS": "1"},
        timeout=180,
    )


def _records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_bug_in_hogwild_workers_fails_a_strict_run(
    tmp_path: Path, subprocess_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Spawn and forkserver workers without zero_grad raise GG101; the run exits 1 regardless."""
    log = tmp_path / "run.jsonl"
    buggy = HOGWILD.replace("{clear}", "pass")
    args = ["-m", "gradguard", "run", "--mode", "strict", "--log-json", str(log), "train.py"]
    proc = _run([*args, METHODS], subprocess_env, tmp_path, buggy)
    # The script ignores its workers' exit codes; under python it would exit 0.
    assert (proc.returncode, proc.stdout) == (1, "trained [1, 1, 1]\n"), proc.stderr
    # Each worker failed as it would under python, at its own opt.step() line.
    assert proc.stderr.count("gradguard.StaleGradientError: GG101 stale-gradient") == 3
    summary = proc.stderr[proc.stderr.index("gradguard: 3 findings (mode=strict, in 3 child") :]
    row = summary.splitlines()[2].split()
    assert row[:5] == ["GG101", "stale-gradient", "3", "2", f"train.py:{STEP_LINE}"]
    assert summary.splitlines()[-2].startswith("gradguard.StaleGradientError in child process ")
    assert summary.splitlines()[-1].startswith("GG101 stale-gradient: step() applied gradients")

    *findings, end = _records(log)
    assert [(r["code"], r["step"], r["location"], r["params"]) for r in findings] == [
        ("GG101", 2, f"train.py:{STEP_LINE}", PARAMS)
    ] * 3
    assert len({r["pid"] for r in findings}) == 3
    assert (end["event"], end["counts"]) == ("summary", {"GG101": 3})
    assert main(["report", str(log)]) == 0
    report = capsys.readouterr().out
    assert report.startswith(f"gradguard: 3 findings in {log}\n")
    assert report.splitlines()[3].split()[:3] == ["GG101", "stale-gradient", "3"]


def test_correct_hogwild_workers_are_silent_in_strict_mode(
    tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    """The correct twin, zero_grad in each worker's loop, exits 0 with stderr empty."""
    correct = HOGWILD.replace("{clear}", "opt.zero_grad()")
    args = ["-m", "gradguard", "run", "--mode", "strict", "train.py", METHODS]
    proc = _run(args, subprocess_env, tmp_path, correct)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "trained [0, 0, 0]\n", "")


def test_fork_children_findings_are_counted_once(
    tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    """Forked workers inherit the session: their findings and norms are added, the parent's once."""
    log = tmp_path / "run.jsonl"
    buggy = HOGWILD.replace("{clear}", "pass")
    args = ["-m", "gradguard", "run", "--mode", "log", "--record-norms", "--log-json", str(log)]
    args.append("train.py")
    proc = _run([*args, "fork,fork", "--parent-trains"], subprocess_env, tmp_path, buggy)
    assert (proc.returncode, proc.stdout) == (0, "trained [0, 0]\n"), proc.stderr
    # 5 steps, judged from the second: 4 each, in the parent and in both workers.
    assert "gradguard: 12 findings (mode=log, 8 of them in 2 child processes)" in proc.stderr
    *records, end = _records(log)
    findings = [r for r in records if r["event"] != "norms"]
    assert [(r["code"], r["step"], r["params"]) for r in findings] == [("GG101", 2, PARAMS)] * 3
    parent, *workers = [r["pid"] for r in findings]
    assert len({parent, *workers}) == 3
    assert (end["event"], end["counts"]) == ("summary", {"GG101": 12})
    # Each process's steps once: a fork drops the norms its parent had not written yet.
    norms = sorted((r["pid"], r["step"]) for r in records if r["event"] == "norms")
    assert norms == sorted((pid, step) for pid in (parent, *workers) for step in range(2, 6))
    # The workers' optimizers share a label; the timeline draws one panel per process.
    series = _plot._series(load([str(log)]))
    assert sorted(series) == sorted(["SGD#0", *(f"SGD#1 (pid {pid})" for pid in workers)])
    assert [s.steps for s in series.values()] == [[2, 3, 4, 5]] * 3


# A DataLoader's workers import torch but never step: they must cost nothing.
LOADER = """\
import sys

import torch
from torch.utils.data import DataLoader, Dataset


class Data(Dataset):
    def __len__(self):
        return 32

    def __getitem__(self, i):
        return torch.full((4,), i / 32), torch.tensor([float(i % 3)])


def check_worker(_):
    # A forked worker has what its parent imported; a spawned one starts afresh.
    if torch.multiprocessing.get_start_method(allow_none=True) == "spawn":
        assert "gradguard" not in sys.modules, "a spawned worker imported gradguard"


if __name__ == "__main__":
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for context, workers in (("fork", 2), ("spawn", 1)):
        loader = DataLoader(
            Data(), batch_size=8, num_workers=workers, multiprocessing_context=context,
            worker_init_fn=check_worker,
        )
        for x, y in loader:
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    print("trained")
"""


def test_dataloader_workers_keep_working_and_spawned_ones_import_nothing(
    tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    """Fork and spawn DataLoader workers work, and a spawned one never imports gradguard."""
    args = ["-m", "gradguard", "run", "--mode", "strict", "--verbose", "train.py"]
    proc = _run(args, subprocess_env, tmp_path, LOADER)
    assert (proc.returncode, proc.stdout) == (0, "trained\n"), proc.stderr
    assert proc.stderr == "gradguard: no findings (mode=strict, 1 optimizer watched)\n"


STEPS_NOTHING = """\
import torch

model = torch.nn.Linear(4, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
with torch.no_grad():
    print(model(torch.ones(1, 4)).shape)
"""


@pytest.mark.usefixtures("isolated_sys")
def test_a_run_that_steps_no_optimizer_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A script that builds an optimizer but never steps it gets one line saying so, not silence."""
    (tmp_path / "eval.py").write_text(STEPS_NOTHING)
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--mode", "strict", "eval.py"]) == 0
    assert capsys.readouterr() == ("torch.Size([1, 1])\n", NOTHING_STEPPED + "\n")


# The child prints what its sitecustomize set and whether startup imported
# torch, then trains without zero_grad; the second child is told nonsense.
SPAWNS_PYTHON = """\
import os, subprocess, sys

subprocess.run([sys.executable, "child.py"], check=True)
env = {**os.environ, "GRADGUARD_CHILDREN": "not json"}
subprocess.run([sys.executable, "child.py"], check=True, env=env)
"""
CHILD = """\
import sys

import sitecustomize

print(sitecustomize.MARK, "torch" in sys.modules)
import torch

model = torch.nn.Linear(2, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for _ in range(3):
    model(torch.ones(4, 2)).sum().backward()
    opt.step()
"""


@pytest.mark.usefixtures("isolated_sys")
def test_a_python_subprocess_is_followed_and_its_sitecustomize_still_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """A subprocess child runs the user's sitecustomize, imports no torch early, and reports.

    One that cannot start gradguard says so once and trains unguarded.
    """
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("MARK = 'the user sitecustomize ran'\n")
    monkeypatch.setenv("PYTHONPATH", f"{site}{os.pathsep}{ROOT}")
    (tmp_path / "spawner.py").write_text(SPAWNS_PYTHON)
    (tmp_path / "child.py").write_text(CHILD)
    monkeypatch.chdir(tmp_path)
    before = dict(os.environ)
    assert main(["run", "--mode", "log", "spawner.py"]) == 0
    out, err = capfd.readouterr()
    assert out == "the user sitecustomize ran False\n" * 2
    unguarded = [line for line in err.splitlines() if "runs unguarded" in line]
    assert len(unguarded) == 1
    assert "GRADGUARD_CHILDREN" in unguarded[0]
    summary = err[err.index("gradguard: 2 findings (mode=log, in 1 child process)") :]
    assert summary.splitlines()[2].split()[:5] == [
        "GG101",
        "stale-gradient",
        "2",
        "2",
        "child.py:12",
    ]
    assert dict(os.environ) == before, "the run left its variables behind"


# A child with both bugs: no zero_grad at all (GG101), then a clear between
# backward and step (GG102), each on its own optimizer.
BOTH_BUGS = LOOP_SCRIPT.format(before="pass", after="pass") + BUGGY_SCRIPT


def _stale(steps: int = 3) -> None:
    """Train in this process without ever clearing the gradients (GG101)."""
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        model(torch.ones(4, 2)).sum().backward()
        opt.step()


def test_the_summary_counts_a_child_in_and_names_each_codes_earliest_occurrence(
    tmp_path: Path, subprocess_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Each code's first location is the earliest in any process; counts add up; the
    JSON log's summary record and its report agree with the exit summary."""
    (tmp_path / "child.py").write_text(BOTH_BUGS)
    log = tmp_path / "run.jsonl"
    gradguard.install(mode="log", log_json=log)
    try:
        train(bug=True, steps=3)  # GG102 here, before the child's
        child = subprocess.run(
            [sys.executable, "child.py"], cwd=tmp_path, capture_output=True, text=True, timeout=180
        )
        assert child.returncode == 0, child.stderr
        _stale()  # GG101 here, after the child's
    finally:
        rows = gradguard.uninstall()
    at_exit = capsys.readouterr().err
    child_step = 1 + BOTH_BUGS.splitlines().index("    opt.step()")
    # Each optimizer's first step is its discovery: GG101 is judged from step 2.
    assert [(r.code, r.count, r.first_step, os.path.basename(r.location)) for r in rows] == [
        ("GG101", 4, 2, f"child.py:{child_step}"),
        ("GG102", 6, 1, f"loops.py:{step_lineno()}"),
    ]
    assert "gradguard: 10 findings (mode=log, 5 of them in 1 child process)" in at_exit
    *_, end = _records(log)
    assert (end["event"], end["counts"]) == ("summary", {"GG101": 4, "GG102": 6})
    assert main(["report", str(log)]) == 0
    report = capsys.readouterr().out
    assert report.startswith(f"gradguard: 10 findings in {log}\n\n")
    assert table(report) == table(at_exit)
