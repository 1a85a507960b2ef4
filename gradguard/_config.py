"""Guard options and a run's mode setting, validated where they are passed.

Torch-free, so that ``gradguard run --help`` and a bad mode given to the
pytest plugin are answered without importing torch.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import threading
from collections.abc import Callable
from typing import Literal, NamedTuple, Protocol, cast

from gradguard._dispatch import MODES, Mode, validate_choice, validate_codes, validate_mode
from gradguard._process import keep

Setting = Literal["warn", "strict", "log", "off"]
"""What a run, `gradguard.install` or the pytest plugin is told: a mode, or ``"off"``."""
SETTINGS: tuple[Setting, ...] = (*MODES, "off")


def validate_setting(value: object, source: str = "mode") -> Setting:
    """Return ``value`` if it is a mode or ``"off"``, else raise naming ``source``."""
    return cast(Setting, validate_choice(value, SETTINGS, source))


def parse_setting(text: object, source: str) -> Setting:
    """A mode or ``"off"`` typed by a person (a flag, ``GRADGUARD``, an ini value).

    Case and surrounding spaces do not matter; the error shows ``text`` as given.
    """
    value = text.strip().lower() if isinstance(text, str) else text
    return validate_setting(value if value in SETTINGS else text, source)


@dataclasses.dataclass(frozen=True)
class Options:
    """Everything a guard can be told; see `gradguard.guard` for the meaning of each."""

    mode: Mode = "warn"
    ignore: frozenset[str] = frozenset()
    accumulation_steps: int | None = None
    check_numerics: bool = True
    numerics_every: int | None = None
    explode_factor: float = 100.0
    max_grad_norm: float | None = None
    unused_after: int = 20
    record_norms: bool = False
    check_ranks_every: int | None = None


OPTION_NAMES = tuple(field.name for field in dataclasses.fields(Options))
"""Every option `gradguard.guard` takes besides the optimizer and the model, in order."""


def make_options(**given: object) -> Options:
    """Check each option given and return them as `Options`; raise naming the bad one.

    Options not given keep `Options`' defaults. Each option has one check
    (`_CHECKS`), whichever entry point it was passed to.
    """
    unknown = sorted(set(given) - set(_CHECKS))
    if unknown:
        raise TypeError(
            f"unknown guard option {unknown[0]!r}; the options are {', '.join(OPTION_NAMES)}"
        )
    checked = {name: _CHECKS[name](value, name) for name, value in given.items()}
    return Options(**checked)  # type: ignore[arg-type]  # each value passed its own check


class Defaults(NamedTuple):
    """What a guard created without these arguments takes from the active session."""

    mode: Mode
    ignore: frozenset[str]
    record_norms: bool


class Source(Protocol):
    """A session, as the guards created while it is active see it."""

    @property
    def mode(self) -> Mode: ...

    @property
    def ignore(self) -> frozenset[str]: ...

    @property
    def record_norms(self) -> bool: ...


# The active sessions, innermost last. Here rather than in `_session` so that
# creating a guard reads them without importing the module that attaches guards.
_ACTIVE: list[Source] = keep("session defaults", [])
_LOCK = threading.Lock()


def activate(session: Source) -> None:
    """Make ``session`` the innermost: guards created from now on take its defaults."""
    with _LOCK:
        _ACTIVE.append(session)


def deactivate(session: Source) -> None:
    """Stop giving ``session``'s defaults; the one active before it gives them again."""
    with _LOCK:
        if session in _ACTIVE:
            _ACTIVE.remove(session)


def session_defaults() -> Defaults:
    """The innermost active session's mode, ignored codes and ``record_norms``.

    Without a session: ``"warn"``, nothing and ``False``. A guard created
    without ``mode=`` under ``gradguard run --mode strict`` is strict: the
    command line decides what the code left open.
    """
    if _ACTIVE:
        session = _ACTIVE[-1]
        return Defaults(session.mode, session.ignore, session.record_norms)
    return Defaults("warn", frozenset(), False)


def _count(value: object, name: str) -> int | None:
    return _positive_int(name, value)


def _optional_count(value: object, name: str) -> int | None:
    return _positive_int(name, value, optional=True)


def _flag(value: object, name: str) -> bool:
    return validate_bool(name, value)


def _factor(value: object, name: str) -> float | None:
    return _positive_float(name, value, above=1.0)


def _optional_norm(value: object, name: str) -> float | None:
    return _positive_float(name, value, optional=True)


_CHECKS: dict[str, Callable[[object, str], object]] = {
    "mode": validate_mode,
    "ignore": validate_codes,
    "accumulation_steps": _optional_count,
    "check_numerics": _flag,
    "numerics_every": _optional_count,
    "explode_factor": _factor,
    "max_grad_norm": _optional_norm,
    "unused_after": _count,
    "record_norms": _flag,
    "check_ranks_every": _optional_count,
}
"""The one check of each option in `Options`, called with the value and the option's name."""


def validate_bool(name: str, value: object) -> bool:
    """Return ``value`` if it is True or False, else raise a TypeError naming ``name``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False; got {value!r}")
    return value


def _positive_int(name: str, value: object, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    # True is an int to Python, never a count to a person; numpy's ints are Integral.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        allowed = "a positive int or None" if optional else "a positive int"
        raise TypeError(f"{name} must be {allowed}; got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int; got {value!r}")
    return int(value)


def _positive_float(
    name: str, value: object, optional: bool = False, above: float = 0.0
) -> float | None:
    if value is None and optional:
        return None
    allowed = f"a finite number above {above:g}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {allowed}{' or None' * optional}; got {value!r}")
    if not math.isfinite(value) or value <= above:
        raise ValueError(f"{name} must be {allowed}; got {value!r}")
    return float(value)


def short_repr(value: object, limit: int = 60) -> str:
    """``repr(value)`` on one line and at most ``limit`` long, for an error message."""
    try:
        text = repr(value)
    except Exception:  # a broken __repr__ must not hide the real error
        text = object.__repr__(value)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(value: object) -> str:
    """``TYPE (repr)``: what a wrong argument was, when its type is the point."""
    return f"{type(value).__name__} ({short_repr(value)})"
