"""gradguard's process-wide state has one home (`gradguard._process`) and one reset."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from conftest import ROOT, Net, batches, loss_of

import gradguard
from gradguard import _process
from gradguard._health import LATENESS

PACKAGE = ROOT / "gradguard"
# Runs as ``sitecustomize`` in every process a followed run starts, before
# anything: it imports no gradguard module, so it keeps its two flags itself.
_OUTSIDE = {"_process.py", "_startup.py"}
# What mutates a module-level object in place.
_MUTATORS = frozenset(
    {"append", "add", "clear", "discard", "extend", "pop", "remove", "setdefault", "update"}
)


def _mutated_names(tree: ast.Module) -> set[str]:
    """Module-level names a module rebinds (``global``) or changes in place."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Global):
            found.update(node.names)
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            for target in targets:
                if isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name):
                    found.add(target.value.id)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in _MUTATORS
            and isinstance(node.func.value, ast.Name)
        ):
            found.add(node.func.value.id)
    return found


def _kept_names(tree: ast.Module) -> set[str]:
    """Module-level names whose object is handed to `keep` or `keep_with`."""
    kept: set[str] = set()
    for node in tree.body:
        value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign, ast.Expr)) else None
        if not (isinstance(value, ast.Call) and isinstance(value.func, ast.Name)):
            continue
        if value.func.id not in ("keep", "keep_with"):
            continue
        if isinstance(node, ast.Assign):
            kept.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            kept.add(node.target.id)
        if len(value.args) > 1 and isinstance(value.args[1], ast.Name):
            kept.add(value.args[1].id)  # keep_with("name", OBJECT, ...)
    return kept


def _module_level(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def test_every_module_level_state_is_kept_in_one_home():
    """A module-level object some module changes (or rebinds) is made with `keep`."""
    loose = []
    for path in sorted(PACKAGE.glob("*.py")):
        if path.name in _OUTSIDE:
            continue
        tree = ast.parse(path.read_text())
        state = _mutated_names(tree) & _module_level(tree)
        loose += [f"{path.name}: {name}" for name in sorted(state - _kept_names(tree))]
    assert loose == []


def test_the_checker_finds_state_that_is_not_kept():
    """The source check above fails on a loose module-level cache (it can fail)."""
    tree = ast.parse("_SEEN = {}\ndef f(k):\n    _SEEN[k] = 1\n_OK = keep('x', {})\n")
    state = _mutated_names(tree) & _module_level(tree)
    assert state - _kept_names(tree) == {"_SEEN"}


def _train(opt: torch.optim.Optimizer, net: Net) -> None:
    for b in batches(3):
        opt.zero_grad()
        loss_of(net, b).backward()
        opt.step()


def test_a_closed_run_holds_nothing_process_wide(tmp_path: Path):
    """Guards and sessions closed, no process-wide state holds anything."""
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with gradguard.guarding(opt, model=net, mode="log"):
        _train(opt, net)
        assert _process.held()["guards"] == 1
        assert _process.held()["slots"] == len(list(net.parameters()))
    gradguard.install(mode="log", log_json=tmp_path / "gg.jsonl")
    opt2 = torch.optim.SGD(net.parameters(), lr=0.1)
    _train(opt2, net)
    assert _process.held()["session defaults"] == 1
    gradguard.uninstall()
    assert {name: n for name, n in _process.held().items() if n} == {}


def test_reset_closes_live_guards_and_stops_sessions(tmp_path: Path):
    """`reset` puts the process back as at import: hooks gone, optimizer unwrapped."""
    net = Net()
    opt = gradguard.guard(torch.optim.SGD(net.parameters(), lr=0.1), model=net, mode="log")
    gradguard.install(mode="log", log_json=tmp_path / "gg.jsonl")
    LATENESS.until_close = True
    _train(opt, net)
    _process.reset()
    assert {name: n for name, n in _process.held().items() if n} == {}
    assert gradguard.guard_of(opt) is None
    assert "zero_grad" not in opt.__dict__
    assert not opt._optimizer_step_pre_hooks
    assert not any(p._post_accumulate_grad_hooks for p in net.parameters())
    assert not LATENESS.until_close
    _train(opt, net)  # the plain optimizer steps on, unguarded
    assert gradguard.guard_of(opt) is None


def test_state_is_kept_once_under_each_name():
    """Every piece has a name of its own; keeping one twice is refused."""
    kept = _process.kept()
    assert {"guards", "slots", "steps", "session defaults", "lateness"} <= set(kept)
    with pytest.raises(ValueError, match="'guards' is kept twice"):
        _process.keep("guards", {})
