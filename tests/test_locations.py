"""A finding names the user's own line, never a library frame, even when a library steps.

The library here is a small package written under a ``site-packages``
directory, as pip installs one: an optimizer wrapper whose ``step()`` steps
the base optimizer (as Lookahead and SAM do), and a whole training loop.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

import pytest
import torch
from test_pytest_plugin import _run as run_pytest
from torch import nn

import gradguard
from gradguard import _naming

PACKAGE = "gg_installed_wrapper"
SOURCE = '''\
"""An installed package: an optimizer wrapper, and a training loop of its own."""
import torch


class Wrapper:
    """Steps its base optimizer from inside its own step(), as Lookahead and SAM do."""

    def __init__(self, base):
        self.base = base

    def zero_grad(self):
        self.base.zero_grad()

    def step(self):
        self.base.step()  # the wrapper's line


def train(model, opt, steps=3):
    """A loop run wholly inside the package: it clears between backward and step."""
    x = torch.ones(4, 2)
    for _ in range(steps):
        model(x).pow(2).mean().backward()
        opt.zero_grad()
        opt.step()  # the package's loop line
'''


def _line(text: str, marker: str) -> int:
    """The number of the line of ``text`` that ends with ``marker``."""
    return next(i for i, line in enumerate(text.splitlines(), 1) if line.endswith(marker))


WRAPPER_LINE = _line(SOURCE, "# the wrapper's line")
LOOP_LINE = _line(SOURCE, "# the package's loop line")
USER_LINE = _line(Path(__file__).read_text(encoding="utf-8"), "# the user's step")


@pytest.fixture
def site_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A ``site-packages`` directory holding the package, first on ``sys.path``."""
    root = tmp_path / "lib" / "python3" / "site-packages"
    (root / PACKAGE).mkdir(parents=True)
    (root / PACKAGE / "__init__.py").write_text(SOURCE, encoding="utf-8")
    monkeypatch.syspath_prepend(str(root))
    yield root
    sys.modules.pop(PACKAGE, None)


@pytest.fixture
def package(site_packages: Path) -> ModuleType:
    """The installed package, imported."""
    return importlib.import_module(PACKAGE)


def _here() -> str:
    """The user's step line as a finding shows it: relative to the current directory."""
    return f"{os.path.relpath(__file__)}:{USER_LINE}"


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(2, 1)


def _buggy_loop(model: nn.Module, opt: Any) -> None:
    """Clears between backward and step (GG102), stepping through ``opt``."""
    x = torch.ones(4, 2)
    for _ in range(3):
        model(x).pow(2).mean().backward()
        opt.zero_grad()
        opt.step()  # the user's step


@contextlib.contextmanager
def _wrapped(package: ModuleType, mode: str) -> Iterator[tuple[nn.Module, Any, gradguard.Guard]]:
    """A model, the package's wrapper around an SGD, and the SGD's guard while it lasts."""
    model = _model()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradguard.guarding(base, model=model, mode=mode) as guard:
        yield model, package.Wrapper(base), guard


def test_a_wrapper_from_an_installed_package_points_at_the_users_step(package) -> None:
    """A finding made inside an installed wrapper's step() names the user's opt.step() line."""
    with _wrapped(package, "log") as (model, opt, guard):
        _buggy_loop(model, opt)
    (finding,) = guard.findings
    assert (finding.code, finding.location) == ("GG102", _here())
    assert f"({_here()})" in finding.message


def test_the_warning_and_the_strict_error_point_there_too(package) -> None:
    """In warn mode the warning is attributed to that line; in strict mode the error names it."""
    with (
        _wrapped(package, "warn") as (model, opt, _),
        pytest.warns(gradguard.ClearedBeforeStepWarning) as record,
    ):
        _buggy_loop(model, opt)
    assert (Path(record[0].filename), record[0].lineno) == (Path(__file__), USER_LINE)
    with (
        _wrapped(package, "strict") as (model, opt, _),
        pytest.raises(gradguard.ClearedBeforeStepError) as info,
    ):
        _buggy_loop(model, opt)
    assert info.value.finding is not None
    assert info.value.finding.location == _here()


def test_a_loop_with_no_line_of_the_users_says_so(package) -> None:
    """A loop run wholly inside the package, in a thread (only library frames on the stack):
    the location says no line of the user's was there, and gives the package's line."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradguard.guarding(opt, model=model, mode="log") as guard:
        worker = threading.Thread(target=package.train, args=(model, opt))
        worker.start()
        worker.join()
    (finding,) = guard.findings
    expected = f"no line of yours on the stack, library code at {PACKAGE}/__init__.py:{LOOP_LINE}"
    assert finding.location == expected


def _naming_calls(package: ModuleType, clear: bool) -> list[str]:
    """The naming module's functions that run in the third step through a library wrapper.

    Without ``clear``, only the first step is cleared: the next two find GG101.
    """
    model = _model()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = package.Wrapper(base)
    x = torch.ones(4, 2)
    calls: list[str] = []

    def trace(frame: FrameType, event: str, arg: object) -> None:
        if event == "call" and frame.f_code.co_filename == _naming.__file__:
            calls.append(frame.f_code.co_name)

    with gradguard.guarding(base, model=model, mode="log"):
        for step in range(3):
            if step == 0 or clear:
                opt.zero_grad()
            model(x).pow(2).mean().backward()
            previous = sys.gettrace()
            if step == 2:
                sys.settrace(trace)
            try:
                opt.step()
            finally:
                sys.settrace(previous)
    return calls


def test_a_step_that_finds_nothing_never_looks_for_the_users_line(package, device_results):
    """A correct step runs no naming code: the line is looked up when a finding fires, or
    once when a device result is left to be judged at a later step."""
    calls = _naming_calls(package, clear=True)
    if device_results == "eager":
        assert calls == []
    else:  # fixed while the step runs, for the judgement that comes later
        assert calls.count("user_location") == 1


def test_each_file_on_the_stack_is_classified_once(package) -> None:
    """A finding through a library's wrapper finds the user's line with cached look-ups only:
    once the stack's files are known, `user_location` runs and nothing under it."""
    calls = _naming_calls(package, clear=False)
    assert calls.count("user_location") == 1
    assert "_is_internal" not in calls
    assert "_is_package" not in calls


STRICT_SCRIPT = f"""\
import torch
from {PACKAGE} import Wrapper

torch.manual_seed(0)
model = torch.nn.Linear(2, 1)
opt = Wrapper(torch.optim.SGD(model.parameters(), lr=0.1))
for _ in range(3):
    model(torch.ones(4, 2)).pow(2).mean().backward()
    opt.zero_grad()
    opt.step()
"""


def test_the_runners_strict_traceback_ends_at_the_users_step(
    tmp_path: Path, site_packages: Path, subprocess_env: dict[str, str]
) -> None:
    """``gradguard run --mode strict``: the traceback ends at the script's own step line,
    without the wrapper's frame, and the message names that line."""
    script = tmp_path / "train.py"
    script.write_text(STRICT_SCRIPT, encoding="utf-8")
    env = {**subprocess_env, "PYTHONPATH": f"{site_packages}{os.pathsep}{os.environ['PYTHONPATH']}"}
    proc = subprocess.run(
        [sys.executable, "-m", "gradguard", "run", "--mode", "strict", "train.py"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.splitlines()
    start = lines.index("Traceback (most recent call last):")
    assert lines[start + 1 : start + 3] == [
        f'  File "{script.resolve()}", line 10, in <module>',
        "    opt.step()",
    ]
    assert lines[start + 3].startswith("gradguard.ClearedBeforeStepError (mode=strict")
    assert "(train.py:10)" in lines[-1]


WRAPPED_TEST = f"""\
import torch
from {PACKAGE} import Wrapper


def test_buggy():
    model = torch.nn.Linear(2, 1)
    opt = Wrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    for _ in range(3):
        model(torch.ones(4, 2)).pow(2).mean().backward()
        opt.zero_grad()
        opt.step()  # the test's step
"""


def test_the_pytest_plugins_traceback_ends_at_the_tests_step(
    pytester: pytest.Pytester,
    site_packages: Path,
    subprocess_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under ``--gradguard=strict`` the failure's traceback ends at the test's step line:
    no frame of the installed wrapper, torch or gradguard is shown."""
    pytester.makepyfile(test_wrapped=WRAPPED_TEST)
    line = _line(WRAPPED_TEST, "# the test's step")
    monkeypatch.setenv("PYTHONPATH", f"{site_packages}{os.pathsep}{os.environ['PYTHONPATH']}")
    result = run_pytest(pytester, "--gradguard=strict")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            ">*opt.step()  # the test's step",
            f"E   *GG102*(test_wrapped.py:{line})*",
            f"test_wrapped.py:{line}: ClearedBeforeStepError",
        ]
    )
    result.stdout.no_fnmatch_line(f"*{PACKAGE}*")
