"""The one home of gradguard's process-wide state, and its reset for tests.

Per-guard state lives in its `Guard`. What outlives any one guard (the guards
of live optimizers, the process's slots, the active sessions, the sinks, the
caches) is made with `keep`, which lists it here under a name; no module
keeps mutable state of its own at module level (`tests/test_process.py`
checks the source; `_startup`, which runs before any gradguard module is
imported, is the one exception). `held` says what each holds: a run that closed all its
guards and sessions holds nothing. `reset` puts everything back as at import,
the last kept first, so what depends on something (a guard, on the slots it
holds) goes before it.

Nothing here imports torch or another gradguard module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol, TypeVar


class Clearable(Protocol):
    def clear(self) -> None: ...


T = TypeVar("T")
C = TypeVar("C", bound=Clearable)


@dataclasses.dataclass(frozen=True)
class _Kept:
    obj: object
    reset: Callable[[], None]
    size: Callable[[], int] | None  # None: a cache or counter, held by design


_KEPT: dict[str, _Kept] = {}


def keep(name: str, obj: C, *, size: Callable[[C], int] | None = None, cache: bool = False) -> C:
    """List ``obj`` as process-wide state under ``name``; reset by its ``clear()``.

    ``size`` tells how much it holds (``len(obj)`` by default); a ``cache``
    (or a counter) holds things by design and is not counted by `held`.
    """
    measure: Callable[[C], int] = size if size is not None else _length
    return keep_with(name, obj, obj.clear, None if cache else measure)


def _length(obj: object) -> int:
    return len(obj)  # type: ignore[arg-type]


def keep_with(
    name: str, obj: T, reset: Callable[[], None], size: Callable[[T], int] | None = None
) -> T:
    """List ``obj`` under ``name`` with its own ``reset``, and ``size`` if it holds anything."""
    if name in _KEPT:
        raise ValueError(f"process state {name!r} is kept twice")
    measure = None if size is None else (lambda: size(obj))
    _KEPT[name] = _Kept(obj, reset, measure)
    return obj


def held() -> dict[str, int]:
    """How much each piece of process-wide state holds now (caches and counters left out)."""
    return {name: kept.size() for name, kept in _KEPT.items() if kept.size is not None}


def kept() -> dict[str, Any]:
    """Every piece of process-wide state, by name."""
    return {name: k.obj for name, k in _KEPT.items()}


def reset() -> None:
    """Put every piece back as at import: guards closed, sessions stopped, all cleared."""
    for kept in reversed(list(_KEPT.values())):
        kept.reset()


class Flag:
    """A process-wide yes or no, with a reset to no."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = False

    def clear(self) -> None:
        self.value = False

    def __len__(self) -> int:
        return int(self.value)
