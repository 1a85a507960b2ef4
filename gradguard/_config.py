"""Guard options: the one table every entry point reads, and one check of each value.

`OPTIONS` has a row per option: its check, how it is read from text (a
flag, an environment variable, an ini value), and the name it goes by in
each place (``--accumulation-steps``, ``GRADGUARD_ACCUMULATION_STEPS``,
``gradguard_accumulation_steps``, ``accumulation_steps`` in
``[tool.gradguard]``). `_sources` reads each source against it and lays
them over each other, lowest first: ``[tool.gradguard]``, the environment,
the command line, then the pytest marker or `gradguard.install`; a session
holds the result, and a guard takes from it only what its own call left
out (`passed`).

Torch-free, so that ``gradguard run --help``, a bad value on the command
line and the pytest plugin are answered without importing torch.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import re
import threading
from collections.abc import Callable, Mapping
from typing import Any, Literal, Protocol, cast

from gradguard._dispatch import MODES, Mode, validate_choice, validate_codes, validate_mode
from gradguard._jsonlog import resolve_path
from gradguard._process import keep

Setting = Literal["warn", "strict", "log", "off"]
"""What a run, `gradguard.install` or the pytest plugin is told: a mode, or ``"off"``."""
SETTINGS: tuple[Setting, ...] = (*MODES, "off")

ENV_VAR = "GRADGUARD"
"""The mode's environment variable; every other option's is ``GRADGUARD_<NAME>``."""
TABLE = "[tool.gradguard]"


def validate_setting(value: object, source: str = "mode") -> Setting:
    """Return ``value`` if it is a mode or ``"off"``, else raise naming ``source``."""
    return cast(Setting, validate_choice(value, SETTINGS, source))


def parse_setting(text: object, source: str) -> Setting:
    """A mode or ``"off"`` typed by a person (a flag, ``GRADGUARD``, an ini value).

    Case and surrounding spaces do not matter; the error shows ``text`` as given.
    """
    return validate_setting(_read_setting(text), source)


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


# -- one check per value ----------------------------------------------------------


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


def _log_path(value: object, name: str) -> str:
    resolve_path(value, name)  # a directory that exists, a name that is no directory
    return os.fspath(cast("str | os.PathLike[str]", value))


# -- reading a value a person typed -------------------------------------------------
# What cannot be read is handed on as typed, so that its check names it as typed.


def _read_setting(text: object) -> object:
    word = text.strip().lower() if isinstance(text, str) else text
    return word if word in SETTINGS else text


def _as_typed(text: str) -> object:
    return text


def _read_int(text: str) -> object:
    word = text.strip()
    if word.lower() == "none":
        return None
    return int(word) if re.fullmatch(r"[+-]?\d+", word) else text


def _read_float(text: str) -> object:
    word = text.strip()
    if word.lower() == "none":
        return None
    try:
        return float(word)
    except ValueError:
        return text


_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def _read_bool(text: str) -> object:
    word = text.strip().lower()
    return True if word in _TRUE else False if word in _FALSE else text


# -- the table ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Option:
    """One option, as every entry point knows it.

    ``check(value, where)`` returns the value checked, or raises naming
    ``where``; ``read(text)`` turns what a person typed into the value to
    check. ``guard_check`` is the check `gradguard.guard` applies where it
    differs (a guard's mode cannot be ``"off"``). An option that is not
    ``per_guard`` belongs to the run (its JSON log) and no guard takes it.
    """

    name: str
    check: Callable[[object, str], object]
    read: Callable[[str], object]
    metavar: str
    help: str
    guard_check: Callable[[object, str], object] | None = None
    per_guard: bool = True
    path: bool = False  # a file path: read relative to the file that names it

    @property
    def boolean(self) -> bool:
        """Whether it is on or off: ``--name`` and ``--no-name`` on a command line."""
        return self.read is _read_bool

    @property
    def flag(self) -> str:
        """``gradguard run``'s flag: ``--accumulation-steps``."""
        return "--" + self.name.replace("_", "-")

    @property
    def pytest_flag(self) -> str:
        """The pytest flag: ``--gradguard-accumulation-steps`` (the mode's: ``--gradguard``)."""
        return "--gradguard" if self.name == "mode" else "--gradguard-" + self.flag[2:]

    @property
    def ini(self) -> str:
        """The pytest ini key: ``gradguard_accumulation_steps`` (the mode: ``gradguard``)."""
        return "gradguard" if self.name == "mode" else "gradguard_" + self.name

    @property
    def env(self) -> str:
        """The environment variable: ``GRADGUARD_ACCUMULATION_STEPS`` (the mode: ``GRADGUARD``)."""
        return ENV_VAR if self.name == "mode" else f"{ENV_VAR}_{self.name.upper()}"


OPTIONS: tuple[Option, ...] = (
    Option(
        "mode",
        validate_setting,
        _read_setting,
        "{" + ",".join(SETTINGS) + "}",
        "strict: raise at the first finding; warn: a Python warning per finding; "
        "log: log events only; off: gradguard does nothing",
        guard_check=validate_mode,
    ),
    Option(
        "ignore",
        validate_codes,
        _as_typed,
        "CODES",
        "finding codes never reported, e.g. GG103 or GG101,GG103",
    ),
    Option(
        "accumulation_steps",
        _optional_count,
        _read_int,
        "N",
        "micro-batches per optimizer step, when gradients are accumulated on purpose: "
        "GG104 when a step comes at another count",
    ),
    Option(
        "check_numerics",
        _flag,
        _read_bool,
        "",
        "the non-finite (GG201) and exploding (GG202) gradient checks (default: on)",
    ),
    Option(
        "numerics_every",
        _optional_count,
        _read_int,
        "N",
        "run the numeric checks every N steps (default: every step, or fewer on a CPU "
        "with more than 256 gradient tensors)",
    ),
    Option(
        "explode_factor",
        _factor,
        _read_float,
        "X",
        "GG202 when the total gradient norm reaches X times the largest of any earlier "
        "step (default: 100)",
    ),
    Option(
        "max_grad_norm",
        _optional_norm,
        _read_float,
        "X",
        "GG202 also when the total gradient norm is above X",
    ),
    Option(
        "unused_after",
        _count,
        _read_int,
        "N",
        "GG301 for a trainable parameter with no gradient in its first N steps (default: 20)",
    ),
    Option(
        "record_norms",
        _flag,
        _read_bool,
        "",
        "write every step's gradient norms (total and per top-level module) to the JSON log",
    ),
    Option(
        "check_ranks_every",
        _optional_count,
        _read_int,
        "K",
        "under torch.distributed, compare the gradients about to be applied across ranks "
        "every K steps (GG401)",
    ),
    Option(
        "log_json",
        _log_path,
        _as_typed,
        "PATH",
        "write one JSON object per finding per line to PATH; {rank} becomes the rank",
        per_guard=False,
        path=True,
    ),
)
"""Every option, in the order help lists them; the guard's come first, as in `Options`."""

BY_NAME = {option.name: option for option in OPTIONS}
GUARD_OPTIONS = tuple(option for option in OPTIONS if option.per_guard)

_CHECKS: dict[str, Callable[[object, str], object]] = {
    option.name: option.guard_check or option.check for option in GUARD_OPTIONS
}
"""The one check of each option in `Options`, called with the value and the option's name."""


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


# -- an argument not passed ---------------------------------------------------------


class Unset:
    """A guard option its call left out: the active session's value, else ``default``.

    Shown as ``default``, so a signature reads ``unused_after: int = 20``.
    """

    __slots__ = ("default",)

    def __init__(self, default: object) -> None:
        self.default = default

    def __repr__(self) -> str:
        return repr(self.default)


_UNSET = {field.name: Unset(field.default) for field in dataclasses.fields(Options)}


def unset(name: str) -> Any:
    """The default of option ``name`` in a signature: its default, marked as not passed."""
    return _UNSET[name]


_NONE_IS_UNSET = ("mode", "ignore", "record_norms", "log_json")
"""Options for which ``None`` has always meant "not given", as leaving them out does."""


def passed(options: Mapping[str, object]) -> dict[str, object]:
    """The options a call was given: all but those left out."""
    return {
        name: value
        for name, value in options.items()
        if not isinstance(value, Unset) and not (value is None and name in _NONE_IS_UNSET)
    }


# -- the active sessions ---------------------------------------------------------------


class Source(Protocol):
    """A session, as the guards created while it is active see it."""

    @property
    def options(self) -> Mapping[str, object]:
        """The guard options this session sets, checked: its mode always, the rest if given."""
        ...


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


def session_defaults() -> dict[str, object]:
    """Each option some active session sets, as the innermost of them sets it.

    A guard created without ``mode=`` under ``gradguard run --mode strict`` is
    strict: the command line decides what the code left open. A session that
    leaves an option unset (an `install` inside ``gradguard run``) lets the
    one around it decide.
    """
    with _LOCK:
        sessions = list(_ACTIVE)
    merged: dict[str, object] = {}
    for session in sessions:
        merged.update(session.options)
    return merged


def session_mode() -> Mode:
    """The mode a guard created now without ``mode=`` gets."""
    return cast(Mode, session_defaults().get("mode", "warn"))


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
