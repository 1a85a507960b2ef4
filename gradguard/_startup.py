"""Run as ``sitecustomize`` at the start of every Python process a followed run starts.

``gradguard run`` (and `gradguard.install`) copies this file, as
``sitecustomize.py``, into a private directory that it puts first on the
``PYTHONPATH`` its children inherit, and describes the run in the
``GRADGUARD_CHILDREN`` variable (see ``gradguard._children``). The interpreter
imports it before the child's own code runs.

Most children never train (a shell tool, pip, a DataLoader worker), so this
imports neither torch nor gradguard: it waits for torch to be imported, then
registers torch's global optimizer step pre-hook, and imports gradguard at the
first step, or as soon as the child imports gradguard itself. Whatever fails
is said once on stderr and the child runs unguarded.

Then it runs the ``sitecustomize`` module it hides, if the environment has one.
"""

# Only what the interpreter has already imported by now: typing alone would
# cost a child 10 ms at startup. Hence no __future__ import and quoted hints.
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import ModuleType
    from typing import Any

ENV_VAR = "GRADGUARD_CHILDREN"

_said = False
_forward: "Any" = None  # gradguard._session.on_child_step, imported at the first step


def say(message: str) -> None:
    """Say once on stderr why this process is not (or no longer) guarded; never raise."""
    global _said
    if _said:
        return
    _said = True
    import contextlib

    stream = sys.stderr
    if stream is None:  # no stderr (2>&-): print(file=None) would write to stdout
        return
    with contextlib.suppress(Exception):  # a closed stderr must not fail the child either
        stream.write(f"gradguard: process {os.getpid()}: {message}\n")
        stream.flush()


def _say(exc: BaseException) -> None:
    say(f"runs unguarded, gradguard could not start: {type(exc).__name__}: {exc}")


def _nothing(*_: object) -> None:
    return None


def _step_hook(opt: object, args: object, kwargs: object) -> None:
    """torch's global step pre-hook: hand every step to gradguard, importing it the first time."""
    global _forward
    if _forward is None:
        _forward = _nothing
        try:
            from gradguard._session import on_child_step

            _forward = on_child_step
        except Exception as exc:
            _say(exc)
    _forward(opt, args, kwargs)


def _torch_loaded() -> None:
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    register_optimizer_step_pre_hook(_step_hook)


def _gradguard_loaded() -> None:
    # A guard() call in the child with no mode= must find the run's mode.
    from gradguard._session import start_child

    start_child()


_WATCHED = {"torch": _torch_loaded, "gradguard": _gradguard_loaded}


class _AfterImport:
    """A meta path finder that finds nothing: it runs a callback once a watched package loaded."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> "Any":
        if name not in _WATCHED:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _ThenLoader(spec.loader, name)
        return spec


class _ThenLoader:
    """Loads the package with its own loader, then runs the callback for it."""

    def __init__(self, loader: "Any", name: str) -> None:
        self._loader = loader
        self._name = name

    def create_module(self, spec: "Any") -> "Any":
        create = getattr(self._loader, "create_module", None)
        return None if create is None else create(spec)

    def exec_module(self, module: "ModuleType") -> None:
        try:
            self._loader.exec_module(module)
        finally:
            # The package keeps its own loader: nothing after the import sees this one.
            if getattr(module, "__loader__", None) is self:
                module.__loader__ = self._loader
            spec = getattr(module, "__spec__", None)
            if spec is not None and spec.loader is self:
                spec.loader = self._loader
        callback = _WATCHED.pop(self._name, None)
        if not _WATCHED:
            sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _AfterImport)]
        if callback is not None:
            try:
                callback()
            except Exception as exc:
                _say(exc)

    def __getattr__(self, attr: str) -> "Any":  # get_resource_reader, get_source, ...
        return getattr(self._loader, attr)


def _arm() -> None:
    for name in list(_WATCHED):
        if name in sys.modules:  # imported before this ran: act now
            _WATCHED.pop(name)()
    if _WATCHED:
        sys.meta_path.insert(0, _AfterImport())


def _chain() -> None:
    """Run the ``sitecustomize`` this one hides further down ``sys.path``, as python would."""
    here = os.path.dirname(os.path.abspath(__file__))
    entries = [os.path.abspath(entry or os.curdir) for entry in sys.path]
    if here not in entries:
        return
    rest = sys.path[entries.index(here) + 1 :]
    # importlib.machinery's PathFinder, without importing importlib at startup.
    bootstrap = sys.modules.get("_frozen_importlib_external")
    if bootstrap is not None:
        finder = bootstrap.PathFinder
    else:
        from importlib.machinery import PathFinder as finder
    spec = finder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    import importlib.util

    module = importlib.util.module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    spec.loader.exec_module(module)


if __name__ == "sitecustomize":
    if os.environ.get(ENV_VAR):
        try:
            _arm()
        except Exception as exc:
            _say(exc)
    _chain()
