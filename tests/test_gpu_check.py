"""benchmarks/gpu_check.py stays runnable on a machine without a GPU."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT

SCRIPT = str(ROOT / "benchmarks" / "gpu_check.py")


def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_the_dry_run_names_every_check_and_exits_0(subprocess_env: dict[str, str]) -> None:
    proc = _run("--dry-run", env=subprocess_env)
    assert proc.returncode == 0, proc.stderr
    for check in ("cuda-tests", "findings", "strict", "amp", "fused", "overhead"):
        assert f"  {check}: " in proc.stdout
    for code in ("GG101", "GG102", "GG103", "GG104", "GG105", "GG201", "GG202", "GG303"):
        assert f"({code})" in proc.stdout


def test_its_loops_pass_on_the_cpu_with_results_held_until_close(
    subprocess_env: dict[str, str],
) -> None:
    """The checks that run anywhere: every code's loop, held-back results against eager ones."""
    proc = _run("--device", "cpu", "--only", "findings,strict,amp", env=subprocess_env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")][2:]
    assert [row.split(" | ")[:2] for row in rows] == [
        ["| findings", "pass"],
        ["| strict", "pass"],
        ["| amp", "pass"],
    ]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_says_so_and_exits_2(subprocess_env: dict[str, str]) -> None:
    proc = _run(env=subprocess_env)
    assert proc.returncode == 2
    assert "torch.cuda.is_available() is False" in proc.stderr


def test_an_unknown_check_is_a_usage_error(subprocess_env: dict[str, str]) -> None:
    proc = _run("--dry-run", "--only", "findings,speed", env=subprocess_env)
    assert proc.returncode == 2
    assert "unknown speed" in proc.stderr
