"""Human names for what a finding points at: parameters and the user's line of code."""

from __future__ import annotations

import gc
import importlib.util
import os
import sys
import weakref
from collections.abc import Iterable, Sequence
from types import FrameType
from typing import NamedTuple

import torch
from torch import nn

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_OWN_DIR = os.path.dirname(__file__) + os.sep
# Frames that belong to the machinery between the user's call and our hook.
_SKIPPED_FILES = ("<frozen ", "<string>")


# Training frameworks that call step() for the user: a finding points past
# their frames to the user's own line (their training_step, or trainer.fit).
_FRAMEWORKS = ("lightning", "pytorch_lightning", "lightning_fabric", "accelerate", "transformers")
_framework_dirs: tuple[str, ...] | None = None


def _frameworks() -> tuple[str, ...]:
    """Directories of the installed frameworks, found once without importing them."""
    global _framework_dirs
    if _framework_dirs is None:
        dirs = []
        for name in _FRAMEWORKS:
            try:
                spec = importlib.util.find_spec(name)
            except (ImportError, ValueError):
                continue
            for location in (spec.submodule_search_locations or []) if spec else []:
                dirs.append(os.path.join(location, ""))
        _framework_dirs = tuple(dirs)
    return _framework_dirs


def _is_internal(filename: str) -> bool:
    return filename.startswith(
        (_TORCH_DIR, _OWN_DIR, *_SKIPPED_FILES, *_frameworks())
    ) or filename.endswith(("/contextlib.py", "/functools.py", "/runpy.py"))


class Location(NamedTuple):
    """Where in the user's code something happened."""

    filename: str
    lineno: int

    def __str__(self) -> str:
        return f"{_display_path(self.filename)}:{self.lineno}" if self.filename else ""


def user_location(skip: int = 1) -> Location:
    """Return the innermost frame outside torch and gradguard as a `Location`.

    Its ``str`` shows paths under the current directory relative to it, so
    messages read ``examples/train.py:23`` rather than an absolute path.
    """
    frame: FrameType | None = sys._getframe(skip)
    while frame is not None and _is_internal(frame.f_code.co_filename):
        frame = frame.f_back
    if frame is None:
        return Location("", 0)
    return Location(frame.f_code.co_filename, frame.f_lineno)


def _display_path(filename: str) -> str:
    try:
        rel = os.path.relpath(filename)
    except ValueError:  # a different drive on Windows
        return filename
    return filename if rel.startswith("..") else rel


class ParamNamer:
    """Maps parameters to qualified names such as ``encoder.0.weight``.

    Names come from the models given with ``model=``; when none is given, the
    modules that own the parameters are found once, on the first finding, so
    the hot path never pays for naming.
    """

    def __init__(self, models: Sequence[nn.Module]) -> None:
        self._models = [weakref.ref(m) for m in models]
        self._names: dict[int, tuple[weakref.ref[torch.Tensor], str]] | None = None

    def names(self, params: Iterable[torch.Tensor], fallback: dict[int, str]) -> tuple[str, ...]:
        """Return the names of ``params``, using ``fallback[id(p)]`` where no module owns one."""
        params = list(params)
        table = self._table(params)
        out = []
        for p in params:
            entry = table.get(id(p))
            if entry is not None and entry[0]() is p:
                out.append(entry[1])
            else:
                out.append(fallback.get(id(p), _shape_name(p)))
        return tuple(out)

    def models(self) -> list[nn.Module]:
        """The live models given with ``model=``."""
        return [m for m in (r() for r in self._models) if m is not None]

    def _table(
        self, params: list[torch.Tensor]
    ) -> dict[int, tuple[weakref.ref[torch.Tensor], str]]:
        if self._names is None or any(id(p) not in self._names for p in params):
            models = self.models() or find_owner_modules(params)
            self._names = _name_table(models)
        return self._names


def _name_table(models: Iterable[nn.Module]) -> dict[int, tuple[weakref.ref[torch.Tensor], str]]:
    table: dict[int, tuple[weakref.ref[torch.Tensor], str]] = {}
    for model in models:
        for name, p in model.named_parameters(remove_duplicate=False):
            table.setdefault(id(p), (weakref.ref(p), _strip_wrappers(name)))
    return table


def _strip_wrappers(name: str) -> str:
    # DistributedDataParallel and torch.compile wrap the user's model; their
    # prefixes are noise in a report about the user's own layers.
    for prefix in ("module.", "_orig_mod."):
        while name.startswith(prefix):
            name = name[len(prefix) :]
    # FSDP1 wraps at every level it shards (its state_dict drops these too).
    return name.replace("_fsdp_wrapped_module.", "")


def find_owner_modules(params: Iterable[torch.Tensor]) -> list[nn.Module]:
    """Find the top-level modules that own any of ``params`` by scanning live objects.

    Costs a walk over the garbage collector's objects, so call it only when a
    finding needs names.
    """
    wanted = {id(p) for p in params}
    modules = [obj for obj in gc.get_objects() if issubclass(type(obj), nn.Module)]
    children = {id(c) for m in modules for c in m.children()}
    scored = [(_coverage(m, wanted), m) for m in modules if id(m) not in children]
    # Prefer the root that covers most of the parameters, then the smaller one.
    scored = [(n, m) for n, m in scored if n]
    scored.sort(key=lambda nm: (-nm[0], sum(1 for _ in nm[1].parameters())))
    return [m for _, m in scored]


def _coverage(module: nn.Module, wanted: set[int]) -> int:
    return sum(1 for p in module.parameters() if id(p) in wanted)


def _shape_name(p: torch.Tensor) -> str:
    return "param(" + "x".join(str(d) for d in p.shape) + ")"


def fallback_names(param_groups: list[dict[str, object]]) -> dict[int, str]:
    """Readable names for parameters no module owns: group, index and shape."""
    out: dict[int, str] = {}
    for g, group in enumerate(param_groups):
        params = group["params"]
        assert isinstance(params, list)
        for i, p in enumerate(params):
            shape = "x".join(str(d) for d in p.shape) or "scalar"
            out.setdefault(id(p), f"group{g}.param{i}[{shape}]")
    return out
