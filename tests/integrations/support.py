"""Helpers for tests that run gradguard inside real training stacks."""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REQUIRE_VAR = "GRADGUARD_REQUIRE_INTEGRATIONS"


def require(module: str) -> ModuleType:
    """Import ``module``; skip the test without it, or fail when CI requires integrations.

    CI sets ``GRADGUARD_REQUIRE_INTEGRATIONS=1`` after installing the
    ``integrations`` extra, so a stack that failed to install cannot pass as
    skipped.
    """
    if os.environ.get(REQUIRE_VAR) == "1":
        try:
            return importlib.import_module(module)
        except ImportError as exc:
            pytest.fail(f"{module} is not importable and {REQUIRE_VAR}=1: {exc}")
    return pytest.importorskip(module)


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# gloo sometimes aborts a rank while the process group is torn down at exit,
# with or without gradguard (measured about 1 run in 12 of a plain torchrun).
GLOO_TEARDOWN_ABORT = "terminate called without an active exception"


def run_worker(worker: Path, out: Path) -> list[dict[str, Any]]:
    """Run a two-rank worker script (``ddp_worker.py``): per rank, per scenario, its result.

    Fails naming the scenarios that raised, so one broken scenario does not
    hide behind the others' results.
    """
    root = worker.resolve().parents[2]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    env.pop("GRADGUARD", None)
    for _attempt in range(2):  # once more after gloo's teardown abort, as in `torchrun`
        proc = subprocess.run(
            [sys.executable, str(worker), str(out)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if proc.returncode == 0 or GLOO_TEARDOWN_ABORT not in proc.stderr:
            break
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads((out / f"rank-{r}.json").read_text()) for r in (0, 1)]
    for rank, result in enumerate(results):
        errors = {k: v["error"] for k, v in result.items() if "error" in v}
        assert not errors, f"rank {rank}: {errors}"
    return results


def codes(result: dict[str, Any]) -> list[str]:
    """The finding codes of one scenario on one rank."""
    return [f["code"] for f in result["findings"]]


def torchrun(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m torch.distributed.run --nproc-per-node=2 ARGS`` on a free loopback port.

    Run again, once, if a rank died in gloo's teardown abort: that is torch's
    flakiness, not the outcome under test.
    """
    require("torch.distributed.run")
    env = {**env, "OMP_NUM_THREADS": "1"}
    for attempt in range(2):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=1",
            "--nproc-per-node=2",
            "--master-addr=127.0.0.1",
            f"--master-port={free_port()}",
            *args,
        ]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=cwd)
        if GLOO_TEARDOWN_ABORT not in proc.stderr or attempt:
            return proc
    return proc
