"""Every example script runs and reports the finding it demonstrates."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXPECTED = {
    "tutorial_loop.py": ["GG102"],
    "tutorial_loop_unguarded.py": [],  # no guard line: tests/test_runner.py runs it guarded
    "missing_zero_grad.py": ["GG101"],
    "step_before_backward.py": ["GG103", "GG102"],
    "accumulation_mismatch.py": ["GG104"],
    "discarded_gradients.py": ["GG105"],
    "foreign_gradient.py": ["GG106"],
    "nan_gradient.py": ["GG201"],
    "exploding_gradient.py": ["GG202"],
    "unused_parameter.py": ["GG301"],
    "unoptimized_parameter.py": ["GG302"],
    "eval_mode_step.py": ["GG303"],
    "rank_divergence.py": ["GG401"],  # two gloo processes on the loopback interface
}
CODES = (
    "GG101",
    "GG102",
    "GG103",
    "GG104",
    "GG105",
    "GG106",
    "GG201",
    "GG202",
    "GG301",
    "GG302",
    "GG303",
    "GG401",
)


def run_example(name: str) -> subprocess.CompletedProcess[str]:
    """Run ``examples/name`` from the repository root, as a user would."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, f"examples/{name}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


@pytest.fixture(scope="module")
def runs() -> dict[str, subprocess.CompletedProcess[str]]:
    """Every example's run, started together: each is mostly torch's import."""
    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        futures = {name: pool.submit(run_example, name) for name in sorted(EXPECTED)}
        return {name: future.result() for name, future in futures.items()}


def test_every_example_is_covered():
    """Each script in examples/ has an expectation here."""
    assert sorted(p.name for p in (ROOT / "examples").glob("*.py")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_reports_its_finding(name, runs):
    """The example exits 0 and its warnings name the expected codes, in order."""
    result = runs[name]
    assert result.returncode == 0, result.stderr
    codes = [c for c in CODES if c in result.stderr]
    assert sorted(codes) == sorted(EXPECTED[name])
    positions = [result.stderr.index(c) for c in EXPECTED[name]]
    assert positions == sorted(positions)


def test_flagship_names_the_parameters_and_its_own_line(runs):
    """The tutorial loop reports GG102 on linear.weight and linear.bias at its step line."""
    result = runs["tutorial_loop.py"]
    lines = (ROOT / "examples" / "tutorial_loop.py").read_text().splitlines()
    step_line = next(i for i, line in enumerate(lines, 1) if "optimizer.step()" in line)
    assert f"examples/tutorial_loop.py:{step_line}" in result.stderr
    assert "params [linear.weight, linear.bias]" in result.stderr
    assert "Fix: move zero_grad() before loss.backward()" in result.stderr
    assert result.stdout.count("Loss: ") == 10  # the script's own output is untouched


def test_flagship_in_strict_mode_raises_at_the_step(tmp_path):
    """With mode="strict" the flagship stops at its first step with GradGuardError."""
    source = (ROOT / "examples" / "tutorial_loop.py").read_text()
    strict = source.replace("model=model)", 'model=model, mode="strict")')
    assert strict != source
    script = tmp_path / "tutorial_loop_strict.py"
    script.write_text(strict)
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert result.returncode == 1
    assert "gradguard.ClearedBeforeStepError: GG102 cleared-before-step" in result.stderr
    assert "Loss:" not in result.stdout
