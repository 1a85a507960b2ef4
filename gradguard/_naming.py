"""Human names for what a finding points at: parameters and the user's line of code."""

from __future__ import annotations

import functools
import gc
import importlib.util
import os
import sys
import sysconfig
import types
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from types import FrameType
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn.modules.module import (
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)
from torch.utils.hooks import RemovableHandle

from gradguard._process import keep, keep_with

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_OWN_DIR = os.path.dirname(__file__) + os.sep
# Frames that belong to the machinery between the user's call and our hook.
_SKIPPED_FILES = ("<frozen ", "<string>")
# Where installed packages live, whatever the prefix: a venv, the system, --user.
_PACKAGE_DIRS = tuple(
    sep + name + sep for name in ("site-packages", "dist-packages") for sep in {os.sep, "/"}
)


# Training frameworks that call step() for the user: a finding points past
# their frames to the user's own line (their training_step, or trainer.fit).
_FRAMEWORKS = ("lightning", "pytorch_lightning", "lightning_fabric", "accelerate", "transformers")


@functools.cache
def _frameworks() -> tuple[str, ...]:
    """Directories of the installed frameworks, found once without importing them."""
    dirs = []
    for name in _FRAMEWORKS:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        for location in (spec.submodule_search_locations or []) if spec else []:
            dirs.append(os.path.join(location, ""))
    return tuple(dirs)


def _python_dirs() -> tuple[str, ...]:
    """The standard library's directories, and the interpreter's scripts directory
    (console-script launchers such as ``bin/gradguard``: generated, never the user's)."""
    dirs = {os.path.dirname(os.__file__), os.path.dirname(sys.executable)}
    dirs.update(sysconfig.get_path(key) for key in ("stdlib", "platstdlib", "scripts"))
    dirs.update([os.path.realpath(d) for d in dirs if d])
    return tuple(os.path.join(d, "") for d in sorted(dirs) if d)


_PYTHON_DIRS = _python_dirs()


@functools.lru_cache(maxsize=4096)
def _is_ours(filename: str) -> bool:
    """torch, gradguard, and code with no file of its own: never a place to point at."""
    return filename.startswith((_TORCH_DIR, _OWN_DIR, *_SKIPPED_FILES))


@functools.lru_cache(maxsize=4096)
def _is_package(filename: str) -> bool:
    """An installed package or a framework, torch and gradguard aside: where a step
    is called from when no line of the user's is on the stack."""
    return not _is_ours(filename) and (
        any(part in filename for part in _PACKAGE_DIRS) or filename.startswith(_frameworks())
    )


def _is_internal(filename: str) -> bool:
    """Whether a frame in ``filename`` is library code rather than the user's own:
    torch, gradguard, an installed package, a framework or the standard library."""
    return _is_ours(filename) or _is_package(filename) or filename.startswith(_PYTHON_DIRS)


# What a frame is, for `user_location`: the user's, an installed package's
# (the place to name when no line of the user's is on the stack), or other
# library code.
_USER, _PACKAGE, _LIBRARY = 0, 1, 2


@functools.lru_cache(maxsize=4096)
def _kind(filename: str) -> int:
    """`_USER`, `_PACKAGE` or `_LIBRARY`: one cached look-up per frame at every step."""
    if _is_package(filename):
        return _PACKAGE
    return _LIBRARY if _is_internal(filename) else _USER


CodeNamer = Callable[[str], str | None]
"""Gives the code compiled under a file name the name a person knows it by, or ``None``."""


class CodeNames:
    """Names for code with no file of its own, such as a notebook's cells.

    IPython compiles each cell under a made-up file name
    (``/tmp/ipykernel_4242/1870.py``); the notebook extension adds a namer that
    knows it as ``cell In[3]``, so a finding reads ``cell In[3]:5``. Asked only
    when a location is shown, never in a step that finds nothing.
    """

    def __init__(self) -> None:
        # An OrderedDict, as torch's hook tables are: a handle refers to it weakly.
        self._namers: OrderedDict[int, CodeNamer] = OrderedDict()

    def add(self, namer: CodeNamer) -> RemovableHandle:
        """Ask ``namer`` from now on, before the namers added earlier; ``remove()`` stops it."""
        handle = RemovableHandle(self._namers)
        self._namers[handle.id] = namer
        return handle

    def name(self, filename: str) -> str | None:
        """What the newest namer that knows ``filename`` calls it; ``None`` when none does."""
        for namer in reversed(list(self._namers.values())):
            try:
                name = namer(filename)
            except Exception:  # a shell torn down under us: the file name will do
                continue
            if name:
                return name
        return None

    def clear(self) -> None:
        self._namers.clear()

    def __len__(self) -> int:
        return len(self._namers)


CODE_NAMES = keep("code names", CodeNames())


class Location(NamedTuple):
    """Where in the user's code something happened.

    ``library`` is true when no frame of the user's code was on the stack:
    the place is then the innermost installed-package line, and says so.
    """

    filename: str
    lineno: int
    library: bool = False

    def __str__(self) -> str:
        if not self.filename:
            return ""
        if self.library:
            where = _package_path(self.filename)
            return f"no line of yours on the stack, library code at {where}:{self.lineno}"
        name = CODE_NAMES.name(self.filename) if CODE_NAMES else None
        return f"{name or _display_path(self.filename)}:{self.lineno}"


@functools.lru_cache(maxsize=4096)
def _location(
    filename: str, lineno: int, library: bool = False, module: str | None = None, scope: int = 0
) -> Location:
    """The `Location` of a line, made once: a step names the same line every time.

    ``module`` is the ``__name__`` in the globals the line runs in, and
    ``scope`` their ``id``: noted for `warning_origin`. Never the globals
    themselves: a script's hold the user's model and tensors.
    """
    if module is not None:
        _MODULES[filename] = (module, scope)
    return Location(filename, lineno, library)


def _forget_modules() -> None:
    _MODULES.clear()
    _location.cache_clear()  # a cached line would not note its module again


# file -> (__name__ of the globals its code last ran in, their id)
_MODULES: dict[str, tuple[str, int]] = keep_with("warning modules", {}, _forget_modules)


def warning_origin(filename: str) -> tuple[str | None, dict[str, Any] | None]:
    """The module a warning about a line of ``filename`` belongs to, as `warnings.warn`'s.

    Returns the ``__name__`` of the globals that file's code ran in (``None``
    when not known) and those globals when they are still the module's in
    ``sys.modules`` by that name (else ``None``): its ``__warningregistry__``
    and loader are the ones a warning raised by that code would use.
    """
    entry = _MODULES.get(filename)
    if entry is None:
        return None, None
    name, scope = entry
    module = sys.modules.get(name)
    found = getattr(module, "__dict__", None) if module is not None else None
    return name, found if isinstance(found, dict) and id(found) == scope else None


_NOWHERE = Location("", 0)


class Place:
    """Where a step is in the user's code, looked up only when first asked for.

    A step that finds nothing never walks the stack. `get` reads the stack of
    the moment, so it must first be called while that step still runs: the
    guard does so before it leaves a result to be judged at a later step.
    """

    _location: Location | None = None  # no __init__: one is made at every step

    @classmethod
    def at(cls, location: Location) -> Place:
        """A place already known."""
        place = cls()
        place._location = location
        return place

    def get(self) -> Location:
        """The `user_location` of the step, found at the first call."""
        if self._location is None:
            self._location = user_location(2)
        return self._location


def user_location(skip: int = 1) -> Location:
    """Return the innermost frame of the user's own code as a `Location`.

    Library frames (torch, gradguard, installed packages, the frameworks, the
    standard library) are skipped. With no user frame on the stack, the
    innermost installed-package frame, marked ``library``; with none of those
    either, an empty location.

    Its ``str`` shows paths under the current directory relative to it, so
    messages read ``examples/train.py:23`` rather than an absolute path. The
    module the line runs in is noted for the warning about it (`warning_origin`).
    """
    frame: FrameType | None = sys._getframe(skip)
    fallback: FrameType | None = None
    while frame is not None:
        kind = _kind(frame.f_code.co_filename)
        if kind == _USER:
            break
        if kind == _PACKAGE and fallback is None:
            fallback = frame
        frame = frame.f_back
    if frame is None:  # no line of the user's
        if fallback is None:
            return _NOWHERE
        frame = fallback
    # Inline, not a helper: a backward pass asks once, and calls are what a step counts.
    scope = frame.f_globals
    module = scope.get("__name__")
    if type(module) is not str:  # only a str is a module's name, and hashable for the cache
        module = None
    return _location(frame.f_code.co_filename, frame.f_lineno, frame is fallback, module, id(scope))


def step_frames(filenames: Sequence[str]) -> int:
    """How many frames of a traceback (outermost first) end it where a finding points.

    The frames past the user's innermost one (or, with none, past the
    innermost installed-package one, as `user_location` picks) are torch's
    step wrapper and gradguard's hooks: the traceback of a strict finding
    stops before them. All frames are kept when neither kind is there.
    """
    for i in range(len(filenames) - 1, -1, -1):
        if not _is_internal(filenames[i]):
            return i + 1
    for i in range(len(filenames) - 1, -1, -1):
        if _is_package(filenames[i]):
            return i + 1
    return len(filenames)


def _package_path(filename: str) -> str:
    """An installed package's file from its package down: ``pytorch_optimizer/optimizer/sam.py``."""
    ends = [i + len(part) for part in _PACKAGE_DIRS if (i := filename.rfind(part)) >= 0]
    return filename[max(ends) :] if ends else _display_path(filename)


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

    def prepare(self, params: list[torch.Tensor]) -> None:
        """Learn the names now, while the models are alive, if that is cheap.

        For results judged later (a device running behind): by then the
        model may be gone with the optimizer. Only a bounded look (given
        models, registrations, globals), never the walk over live objects.
        """
        if self._names is None:
            models = self.models() or find_owner_modules(params, walk=False)
            if models:
                self._names = _name_table(models)

    def _table(
        self, params: list[torch.Tensor]
    ) -> dict[int, tuple[weakref.ref[torch.Tensor], str]]:
        if self._names is None or any(id(p) not in self._names for p in params):
            models = self.models() or find_owner_modules(params)
            # Keep what was learned: models that died since named parameters too.
            self._names = {**(self._names or {}), **_name_table(models)}
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


class Registrations:
    """Which module holds each parameter and submodule, as modules are built.

    While a session is on (``gradguard run``, `gradguard.install`, the pytest
    plugin), torch's global module and parameter registration hooks note, for
    every module built, its parameters and its submodules by name: one Python
    call per registration, at construction time only, none in a forward or a
    backward pass (so torch.compile sees nothing). Parameters are then named
    (`find_owner_modules`), and modules outside the guarded model found
    (GG302), without walking the heap.
    """

    def __init__(self) -> None:
        # id -> (weak reference to the object, weak reference to what holds it)
        self.params: dict[int, tuple[weakref.ref[torch.Tensor], weakref.ref[nn.Module]]] = {}
        self.parents: dict[int, tuple[weakref.ref[nn.Module], weakref.ref[nn.Module]]] = {}
        self._users = 0
        self._handles: list[RemovableHandle] = []

    def start(self) -> None:
        """Note registrations from now on (counted: one `stop` per `start`)."""
        self._users += 1
        if not self._handles:
            self._handles = [
                register_module_parameter_registration_hook(self._parameter),
                register_module_module_registration_hook(self._module),
            ]

    def stop(self) -> None:
        """The last user stopped: remove the hooks and forget what they noted."""
        self._users = max(0, self._users - 1)
        if self._users == 0:
            for handle in self._handles:
                handle.remove()
            self._handles = []
            self.params.clear()
            self.parents.clear()

    def clear(self) -> None:
        """Stop noting, whoever started (a reset for tests)."""
        self._users = 1
        self.stop()

    def __len__(self) -> int:
        return self._users

    def roots(self, params: Iterable[torch.Tensor]) -> list[nn.Module]:
        """The outermost modules holding ``params``, as far as registrations tell."""
        out: dict[int, nn.Module] = {}
        for p in params:
            entry = self.params.get(id(p))
            holder = entry[1]() if entry is not None and entry[0]() is p else None
            root = self._root(holder) if holder is not None else None
            if root is not None:
                out.setdefault(id(root), root)
        return list(out.values())

    def top_level(self) -> list[nn.Module]:
        """The outermost live modules holding a parameter built while noting."""
        out: dict[int, nn.Module] = {}
        for _, holder in list(self.params.values()):
            module = holder()
            if module is not None:
                root = self._root(module)
                out.setdefault(id(root), root)
        return list(out.values())

    def _root(self, module: nn.Module) -> nn.Module:
        for _ in range(256):  # no cycle is possible, but never loop forever
            entry = self.parents.get(id(module))
            parent = entry[1]() if entry is not None and entry[0]() is module else None
            if parent is None:
                return module
            module = parent
        return module

    def _parameter(self, module: nn.Module, name: str, param: torch.Tensor | None) -> None:
        # While torch.compile compiles, the modules built are its graphs, which hold the
        # parameters they use under names of their own: the model is the one outside.
        if param is not None and not torch.compiler.is_compiling():
            self._tidy(self.params)
            self.params[id(param)] = (weakref.ref(param), weakref.ref(module))

    def _module(self, module: nn.Module, name: str, sub: nn.Module | None) -> None:
        if sub is not None and not torch.compiler.is_compiling():
            self._tidy(self.parents)
            self.parents.setdefault(id(sub), (weakref.ref(sub), weakref.ref(module)))

    @staticmethod
    def _tidy(table: dict[int, Any]) -> None:
        """Drop dead entries once the table doubles: amortised O(1) per registration."""
        if len(table) >= 1024 and len(table) & (len(table) - 1) == 0:
            for key, entry in list(table.items()):
                if entry[0]() is None:
                    del table[key]


REGISTRATIONS = keep("module registrations", Registrations())


def named_modules_in_main() -> list[tuple[str, nn.Module]]:
    """The modules the script's globals hold (``model``), or an object there holds
    (``trainer.teacher_model``), by those names. Reads ``__dict__``s only: no properties."""
    named: list[tuple[str, nn.Module]] = []
    main = sys.modules.get("__main__")
    for key, value in list(vars(main).items()) if main is not None else []:
        if isinstance(value, nn.Module):
            named.append((key, value))
        elif not isinstance(value, (type, types.ModuleType)) and hasattr(value, "__dict__"):
            attrs = vars(value)
            if isinstance(attrs, dict):
                named.extend(
                    (f"{key}.{attr}", v)
                    for attr, v in list(attrs.items())
                    if isinstance(v, nn.Module)
                )
    return named


def find_owner_modules(params: Iterable[torch.Tensor], *, walk: bool = True) -> list[nn.Module]:
    """The top-level modules that own any of ``params``, most covering first.

    Looked up in `REGISTRATIONS` (modules built while a session was on) and in
    the script's globals: a bounded look, whatever the heap size. Failing
    those (a model built before, held by no global, guarded without
    ``model=``), a walk over the garbage collector's live objects, unless
    ``walk`` is false.
    """
    params = list(params)
    wanted = {id(p) for p in params}
    modules = REGISTRATIONS.roots(params) + [m for _, m in named_modules_in_main()]
    found = _covering(modules, wanted)
    if not found and walk:
        live = [obj for obj in gc.get_objects() if issubclass(type(obj), nn.Module)]
        found = _covering(live, wanted)
    return found


def _covering(modules: list[nn.Module], wanted: set[int]) -> list[nn.Module]:
    """The top-level ones of ``modules`` holding any ``wanted`` parameter, most first."""
    children = {id(c) for m in modules for c in m.children()}
    roots = list({id(m): m for m in modules if id(m) not in children}.values())
    scored = [(n, m) for n, m in ((_coverage(m, wanted), m) for m in roots) if n]
    # Prefer the root that covers most of the parameters, then the smaller one.
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
