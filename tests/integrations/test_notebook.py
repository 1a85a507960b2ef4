"""``%load_ext gradguard`` in a real IPython kernel: the tutorial run as a notebook.

One kernel runs one notebook for the whole module (a kernel takes seconds to
start): the tutorial's buggy loop, the correct twin, then each ``%gradguard``
command. Each test reads the outputs of the cells it is about.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from support import require

ROOT = Path(__file__).resolve().parents[2]

nbclient = require("nbclient")
nbformat = require("nbformat")
require("ipykernel")
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402  (nbclient's dependency)
from jupyter_client.manager import AsyncKernelManager  # noqa: E402

# The tutorial as users paste it into cells: the program, then its loop.
TUTORIAL = (ROOT / "examples" / "tutorial_loop_unguarded.py").read_text(encoding="utf-8")
PROGRAM = TUTORIAL[TUTORIAL.index("import torch") : TUTORIAL.index("for epoch")].strip()
LOOP = TUTORIAL[TUTORIAL.index("for epoch") :].strip()
CORRECT = LOOP.replace(
    "    loss.backward()\n    optimizer.zero_grad()\n",
    "    optimizer.zero_grad()\n    loss.backward()\n",
)
assert CORRECT != LOOP
SHORT = LOOP.replace("range(100)", "range(3)")  # the bug again, in fewer steps
FRESH = "model = LinearRegression()\noptimizer = torch.optim.SGD(model.parameters(), lr=0.01)\n"
# A clear no zero_grad() wrapper sees: only the device's zero check, read after the
# step, tells it from a clip. The test switch holds every such result until asked.
HELD = f"""\
from gradguard._health import LATENESS

LATENESS.until_close = True
{FRESH}for epoch in range(5):
    optimizer.zero_grad()
    loss = criterion(model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=False)
    optimizer.step()
LATENESS.until_close = False"""

CELLS = {
    "load": "%load_ext gradguard",
    "program": PROGRAM,
    "buggy": LOOP,
    "summary": "%gradguard summary",
    "correct": FRESH + CORRECT,
    "status": "%gradguard",
    "strict": "%gradguard strict",
    "buggy-strict": FRESH + SHORT,
    "bad": "%gradguard loud",
    "off": "%gradguard off",
    "buggy-off": FRESH + SHORT,
    "warn": "%gradguard warn",
    "held": HELD,
    "summary-all": "%gradguard summary",
    "unload": "%unload_ext gradguard",
    "buggy-unloaded": FRESH + SHORT,
    "gone": "%gradguard",
}


def _kernel(directory: Path) -> AsyncKernelManager:
    """A kernel of this interpreter, whatever kernels the machine has installed (none on CI)."""
    spec = directory / "kernels" / "gradguard-test"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    kernel = {"argv": argv, "display_name": "gradguard test", "language": "python"}
    (spec / "kernel.json").write_text(json.dumps(kernel), encoding="utf-8")
    specs = KernelSpecManager(kernel_dirs=[str(spec.parent)])
    return AsyncKernelManager(
        kernel_name="gradguard-test",
        kernel_spec_manager=specs,
        connection_file=str(directory / "connection.json"),
    )


@pytest.fixture(scope="module")
def cells(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every cell of the notebook after one run in a real kernel, by name."""
    directory = tmp_path_factory.mktemp("notebook")
    notebook = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell(source) for source in CELLS.values()]
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADGUARD")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["IPYTHONDIR"] = str(directory / "ipython")  # no profile or startup file of the machine's
    client = nbclient.NotebookClient(
        notebook,
        km=_kernel(directory),
        timeout=120,
        startup_timeout=120,
        allow_errors=True,  # the strict and usage-error cells fail on purpose
        resources={"metadata": {"path": str(directory)}},
    )
    client.execute(env=env, cleanup_kc=True)  # the kernel is ours: shut it down after
    nbformat.write(notebook, directory / "tutorial.ipynb")  # to read when a test fails
    return dict(zip(CELLS, notebook.cells, strict=True))


def _stream(cell: Any, name: str) -> str:
    return "".join(o["text"] for o in cell.outputs if o.get("name") == name)


def _errors(cell: Any) -> list[Any]:
    return [o for o in cell.outputs if o["output_type"] == "error"]


def _line(cell: Any, code: str) -> int:
    """The number of the first line of ``cell`` that runs ``code``."""
    return next(i for i, text in enumerate(cell.source.splitlines(), 1) if code in text)


def _at(cell: Any, code: str) -> str:
    """``cell In[3]:6``: the line of ``cell`` that runs ``code``, named as findings name it."""
    return f"cell In[{cell.execution_count}]:{_line(cell, code)}"


def _found(table: str) -> int:
    """How many findings a summary's title counts: ``gradguard: 100 findings (mode=warn)``."""
    match = re.match(r"gradguard: (\d+) findings? \(mode=\w+\)", table)
    assert match, table
    return int(match.group(1))


def test_the_tutorial_loop_cell_shows_gg102_with_its_lines(cells: dict[str, Any]) -> None:
    """The tutorial's loop cell shows GG102 at its step line, naming the cell's other lines."""
    buggy = cells["buggy"]
    assert not _errors(buggy), "warn mode must never fail the cell"
    shown = _stream(buggy, "stderr")
    assert shown.count("GG102 cleared-before-step") == 1, shown
    assert f"of SGD#0 ({_at(buggy, 'optimizer.step()')})" in shown
    assert f"backward() at {_at(buggy, 'loss.backward()')} wrote them" in shown
    assert f"optimizer.zero_grad() at line {_line(buggy, 'zero_grad')} cleared them" in shown
    assert "params [linear.weight, linear.bias]" in shown
    assert "Epoch [100/100]" in _stream(buggy, "stdout")  # the loop ran to the end


def test_the_summary_cell_lists_the_tutorials_finding(cells: dict[str, Any]) -> None:
    """``%gradguard summary`` prints the table, GG102 first seen at the loop cell's step."""
    table = _stream(cells["summary"], "stdout")
    assert "(mode=warn)" in table.splitlines()[0]
    assert _found(table) > 1  # one per step, each counted
    row = next(line for line in table.splitlines() if line.startswith("GG102"))
    assert "cleared-before-step" in row
    assert _at(cells["buggy"], "optimizer.step()") in row
    assert "linear.weight, linear.bias" in row


def test_the_correct_loop_shows_nothing(cells: dict[str, Any]) -> None:
    """The correct twin, guarded the same way, leaves its cell's output as without gradguard."""
    correct = cells["correct"]
    assert _stream(correct, "stderr") == ""
    assert not _errors(correct)
    assert "Epoch [100/100]" in _stream(correct, "stdout")
    status = _stream(cells["status"], "stdout")
    assert status.startswith("gradguard: mode=warn, guarding every optimizer"), status
    before = _found(_stream(cells["summary"], "stdout"))
    assert f"2 optimizers watched, {before} findings" in status  # none added by the correct loop


def test_strict_mode_fails_the_faulty_cell_naming_gg102(cells: dict[str, Any]) -> None:
    """After ``%gradguard strict`` the faulty cell stops with the finding's error."""
    assert "mode=strict" in _stream(cells["strict"], "stdout")
    cell = cells["buggy-strict"]
    [error] = _errors(cell)
    assert error["ename"] == "ClearedBeforeStepError"
    assert error["evalue"].startswith("GG102 cleared-before-step")
    assert f"({_at(cell, 'optimizer.step()')})" in error["evalue"]
    assert "Epoch" not in _stream(cell, "stdout")  # it stopped at the first step


def test_a_bad_argument_is_a_usage_error_naming_it(cells: dict[str, Any]) -> None:
    """``%gradguard loud`` says what it takes and what it got, and changes nothing."""
    said = _stream(cells["bad"], "stderr")
    assert "UsageError: %gradguard takes one of warn | strict | log | off" in said
    assert "got 'loud'" in said
    assert "mode=strict" not in _stream(cells["off"], "stdout")  # `off` found strict running


def test_off_stops_guarding(cells: dict[str, Any]) -> None:
    """After ``%gradguard off`` a faulty loop runs as without gradguard; warn turns it back on."""
    assert _stream(cells["off"], "stdout").startswith("gradguard: off, nothing is guarded")
    faulty = cells["buggy-off"]
    assert faulty.outputs == [], faulty.outputs
    assert "mode=warn" in _stream(cells["warn"], "stdout")


def test_a_finding_judged_after_the_step_shows_under_the_cell_that_ran_it(
    cells: dict[str, Any],
) -> None:
    """A result the device gives only later is judged as the cell ends, and shown under it."""
    held = cells["held"]
    shown = _stream(held, "stderr")
    assert "GG102 cleared-before-step" in shown, held.outputs
    assert f"({_at(held, 'optimizer.step()')})" in shown
    assert _stream(cells["summary-all"], "stderr") == ""


def test_the_summary_counts_every_mode(cells: dict[str, Any]) -> None:
    """The summary covers every finding since the extension was loaded, across mode changes."""
    table = _stream(cells["summary-all"], "stdout")
    row = next(line for line in table.splitlines() if line.startswith("GG102"))
    assert _at(cells["buggy"], "optimizer.step()") in row  # still the first one


def test_unloading_removes_the_guard_and_the_magic(cells: dict[str, Any]) -> None:
    """After ``%unload_ext gradguard`` a faulty loop shows nothing and ``%gradguard`` is gone."""
    assert cells["unload"].outputs == []
    assert cells["buggy-unloaded"].outputs == []
    assert "Line magic function `%gradguard` not found" in _stream(cells["gone"], "stderr")
