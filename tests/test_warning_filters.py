"""Warn mode's warnings belong to the user's module: Python's filters treat them as its own."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
import types
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import child_env

import gradguard

# The tutorial's bug in a user's own module: backward, zero_grad, step.
TRAIN = """\
import torch
import gradguard


def train(steps=5):
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradguard.guarding(opt):
        for _ in range(steps):
            model(torch.ones(1, 2)).sum().backward()
            opt.zero_grad()
            opt.step()
"""
STEP_LINE = TRAIN.splitlines().index("            opt.step()") + 1
MODULES = ("train", "other", "third")


@pytest.fixture
def mypkg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    """``mypkg.train``, with ``mypkg.other`` and ``mypkg.third`` the same buggy loop, imported
    from a real package."""
    package = tmp_path / "mypkg"
    package.mkdir()
    (package / "__init__.py").write_text("", encoding="utf-8")
    for name in MODULES:
        (package / f"{name}.py").write_text(TRAIN, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    import mypkg.other
    import mypkg.train

    yield mypkg.train
    for name in ("mypkg", *(f"mypkg.{name}" for name in MODULES)):
        sys.modules.pop(name, None)


def _shown(train: types.ModuleType, action: str = "always", **ignore: object) -> list[str]:
    """Where ``mypkg.train.train()`` then ``mypkg.other.train()`` were warned about, as
    ``file:line``, under the ``action`` filter and, given its arguments, an ignore filter."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter(action)  # type: ignore[call-overload]
        if ignore:
            warnings.filterwarnings("ignore", **ignore)  # type: ignore[arg-type]
        train.train()
        sys.modules["mypkg.other"].train()
    return [
        f"{Path(w.filename).name}:{w.lineno}"
        for w in caught
        if issubclass(w.category, gradguard.GradGuardWarning)
    ]


def test_a_module_filter_on_a_package_silences_that_module_only(
    mypkg: types.ModuleType,
) -> None:
    """``filterwarnings(module=r"mypkg\\.train")`` silences train.py's warning, not other.py's."""
    ours = gradguard.GradGuardWarning
    assert _shown(mypkg) == [f"train.py:{STEP_LINE}", f"other.py:{STEP_LINE}"]
    assert _shown(mypkg, category=ours, module=r"mypkg\.train") == [f"other.py:{STEP_LINE}"]
    assert _shown(mypkg, category=ours, module=r"mypkg\.other") == [f"train.py:{STEP_LINE}"]
    assert _shown(mypkg, category=ours, module="mypkg") == []  # a regex on the start, as Python's
    assert _shown(mypkg, category=ours, module="train") == _shown(mypkg)  # not the file's name


@pytest.mark.parametrize("action", ["default", "once", "module"])
def test_repeats_across_steps_are_shown_once_and_kept_in_the_modules_registry(
    mypkg: types.ModuleType, action: str
) -> None:
    """Five buggy steps show one warning per module, recorded where ``warnings.warn`` would."""
    assert _shown(mypkg, action) == [f"train.py:{STEP_LINE}", f"other.py:{STEP_LINE}"]
    registry = vars(mypkg)["__warningregistry__"]
    assert [key[1:] for key in registry if len(key) == 3 and key[2]] == [
        (gradguard.ClearedBeforeStepWarning, STEP_LINE)
    ]


def test_w_options_naming_a_module_apply_to_it_only(mypkg: types.ModuleType) -> None:
    """``python -W ignore::gradguard.GradGuardWarning:mypkg.train`` silences that module, and
    ``-W ignore:GG:UserWarning:mypkg.other``, which needs no import, silences that one."""
    package = Path(mypkg.__file__ or "").parent
    env = child_env()
    env["PYTHONPATH"] = f"{package.parent}{os.pathsep}{env['PYTHONPATH']}"
    run = "".join(f"import mypkg.{name}\nmypkg.{name}.train()\n" for name in MODULES)
    proc = subprocess.run(
        [
            sys.executable,
            "-W",
            "ignore::gradguard.GradGuardWarning:mypkg.train",
            "-W",
            "ignore:GG:UserWarning:mypkg.other",
            "-c",
            run,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    shown = [line for line in proc.stderr.splitlines() if "ClearedBeforeStepWarning" in line]
    assert len(shown) == 1, proc.stderr
    assert shown[0].startswith(f"{package / 'third.py'}:{STEP_LINE}: "), proc.stderr


def test_a_script_run_as_main_warns_as_main(tmp_path: Path, isolated_sys: None) -> None:
    """A top-level script's warning is ``__main__``'s, as its own warnings are."""
    script = tmp_path / "train_script.py"
    script.write_text(TRAIN + "\ntrain()\n", encoding="utf-8")
    ours = gradguard.GradGuardWarning
    for module, expected in [("__main__", 0), ("train_script", 1), ("other", 1)]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warnings.filterwarnings("ignore", category=ours, module=module)
            runpy.run_path(str(script), run_name="__main__")
        assert [(Path(w.filename).name, w.lineno) for w in caught] == expected * [
            ("train_script.py", STEP_LINE)
        ]


def test_code_of_no_known_module_is_filtered_by_its_files_name() -> None:
    """Code run with no ``__name__`` in its globals is named after its file, as before."""
    code = compile(TRAIN + "\ntrain()\n", "snippet.py", "exec")
    for module, expected in [("snippet", 0), ("other", 1)]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warnings.filterwarnings("ignore", category=gradguard.GradGuardWarning, module=module)
            exec(code, {})
        assert [(w.filename, w.lineno) for w in caught] == expected * [("snippet.py", STEP_LINE)]


class _BrokenLoader:
    def get_source(self, name: str) -> str:
        raise OSError("the source is gone")


@pytest.mark.parametrize("broken", ["loader", "registry"])
def test_a_module_that_breaks_warnings_machinery_still_gets_its_warning(
    tmp_path: Path, broken: str
) -> None:
    """A loader that cannot give the source, or a registry that is not one: the warning shows."""
    path = tmp_path / "odd.py"
    path.write_text(TRAIN, encoding="utf-8")
    module = types.ModuleType("odd_module")
    module.__file__ = str(path)
    if broken == "loader":
        module.__loader__ = _BrokenLoader()  # type: ignore[assignment]
    else:
        module.__warningregistry__ = "not a registry"  # type: ignore[attr-defined]
    sys.modules["odd_module"] = module
    try:
        exec(compile(TRAIN, str(path), "exec"), vars(module))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module.train()
    finally:
        del sys.modules["odd_module"]
    assert [(w.category, w.lineno) for w in caught] == [
        (gradguard.ClearedBeforeStepWarning, STEP_LINE)
    ]
