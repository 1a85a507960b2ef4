"""Process-wide activation: guard every optimizer the process steps, with no code change.

A `Session` registers torch's global optimizer step pre-hook, which runs for
every optimizer at every step. The first time it sees an optimizer it attaches
a guard; that guard's own step hooks are registered while torch is still
calling the global ones, and torch calls them in the same step. The guard skips
judging that first step: the backward before it ran before any hook existed.

Used by `gradguard.install`, ``gradguard run`` and the pytest plugin.
"""

from __future__ import annotations

import atexit
import sys
import threading
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, TextIO

from torch.optim.optimizer import register_optimizer_step_pre_hook

from gradguard._dispatch import (
    MODES,
    Mode,
    SinkHandle,
    SummaryRow,
    _log,
    add_record_sink,
    add_sink,
    validate_codes,
    validate_mode,
)
from gradguard._findings import Finding
from gradguard._jsonlog import JsonLog
from gradguard._naming import REGISTRATIONS
from gradguard._report import plural, render_table, wants_colour, width_for

if TYPE_CHECKING:
    import torch
    from torch.utils.hooks import RemovableHandle

    from gradguard._guard import Guard

Setting = Literal["warn", "strict", "log", "off"]
SETTINGS: tuple[Setting, ...] = (*MODES, "off")

_ACTIVE: list[Session] = []
_INSTALLED: Session | None = None
_LOCK = threading.Lock()


def validate_setting(value: object, source: str = "mode") -> Setting:
    """Return ``value`` if it is a mode or ``"off"``, else raise naming ``source``."""
    if value == "off":
        return "off"
    if isinstance(value, str) and value not in SETTINGS:
        raise ValueError(f"{source}={value!r} is not a mode; use one of: {', '.join(SETTINGS)}")
    return validate_mode(value, source)


class Defaults(NamedTuple):
    """What a guard created without these arguments takes from the active session."""

    mode: Mode
    ignore: frozenset[str]
    record_norms: bool


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


class Session:
    """Guards every optimizer stepped while it is active, and counts what they find.

    It owns the guards it attached and closes them on `stop`; guards the user
    created with `gradguard.guard` stay with the user, but their findings are
    counted and logged here too.
    """

    def __init__(
        self,
        mode: Mode,
        *,
        ignore: frozenset[str] = frozenset(),
        log_json: object = None,
        verbose: bool = False,
        record_norms: bool = False,
    ) -> None:
        if record_norms and log_json is None:
            raise ValueError(
                "record_norms=True needs log_json=PATH: the norms are written to the JSON log"
            )
        self.mode: Mode = mode
        self.ignore = ignore
        self.verbose = verbose
        self.record_norms = record_norms
        self.findings: list[Finding] = []
        self.optimizers = 0
        self._counts: dict[str, int] = {}
        self._first: dict[str, Finding] = {}
        self._owned: weakref.WeakSet[Guard] = weakref.WeakSet()
        self._seen: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
        self._log = None if log_json is None else JsonLog(log_json)
        self._hook: RemovableHandle | None = None
        self._sinks: list[SinkHandle] = []
        self.active = False

    @property
    def log_path(self) -> str | None:
        """The JSON-lines file this session writes, if any."""
        return None if self._log is None else self._log.path

    def start(self) -> None:
        """Begin guarding every optimizer at its next step."""
        if self.active:
            return
        self.active = True
        self._sinks.append(add_sink(self._on_finding))
        if self._log is not None:
            self._sinks.append(add_sink(self._log))
            self._sinks.append(add_record_sink(self._log.write_record))
        self._hook = register_optimizer_step_pre_hook(self._discover)
        REGISTRATIONS.start()  # name parameters without walking the heap
        with _LOCK:
            _ACTIVE.append(self)

    def stop(self) -> None:
        """Stop discovering optimizers and close the guards this session attached.

        Every guard is closed even if one raises; the first `GradGuardError`
        (a strict-mode finding that was still being computed on the device)
        is raised once everything is cleaned up.
        """
        if not self.active:
            return
        self.active = False
        with _LOCK:
            if self in _ACTIVE:
                _ACTIVE.remove(self)
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        REGISTRATIONS.stop()
        error: BaseException | None = None
        try:
            for g in list(self._owned):
                try:
                    g.close()
                except Exception as exc:
                    error = error or exc
        finally:
            for handle in reversed(self._sinks):
                handle.remove()
            self._sinks.clear()
            if self._log is not None:
                self._log.close()
        if error is not None:
            raise error

    def _discover(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if opt in self._seen:
            return
        self._seen.add(opt)
        self.optimizers += 1
        try:
            from gradguard._guard import attach, guard_of

            if guard_of(opt) is None:
                g = attach(
                    opt,
                    mode=self.mode,
                    ignore=self.ignore,
                    record_norms=self.record_norms,
                    judge_first_step=False,
                )
                self._owned.add(g)
        except Exception as exc:  # never break the user's step
            _log().error(
                "internal-error",
                where="optimizer discovery",
                error=f"{type(exc).__name__}: {exc}",
                note=f"gradguard does not watch {type(opt).__name__}; training continues",
            )

    def _on_finding(self, finding: Finding, first: bool) -> None:
        if first:
            self.findings.append(finding)
        self._counts[finding.code] = self._counts.get(finding.code, 0) + 1
        self._first.setdefault(finding.code, finding)

    def summary(self) -> list[SummaryRow]:
        """Per code: how often it fired while active, and where and how it first did."""
        rows = []
        for code in sorted(self._counts):
            f = self._first[code]
            rows.append(
                SummaryRow(
                    code=code,
                    name=f.name,
                    level=f.level,
                    count=self._counts[code],
                    first_step=f.step,
                    location=f.location,
                    params=f.params,
                    hint=f.hint,
                )
            )
        return rows

    def print_summary(self, file: TextIO | None = None) -> None:
        """Write the summary to stderr; nothing when nothing was found, unless verbose."""
        stream = sys.stderr if file is None else file
        text = format_summary(
            self.summary(),
            self.mode,
            self.optimizers,
            self.verbose,
            colour=wants_colour(stream),
            width=width_for(stream),
        )
        if text:
            print(text, file=stream, flush=True)


def format_summary(
    rows: list[SummaryRow],
    mode: str,
    optimizers: int,
    verbose: bool,
    *,
    colour: bool = False,
    width: int = 100,
) -> str:
    """The end-of-run summary: a title, then the table ``gradguard report`` prints too."""
    if not rows:
        if not verbose:
            return ""
        return f"gradguard: no findings (mode={mode}, {plural(optimizers, 'optimizer')} watched)"
    total = sum(r.count for r in rows)
    title = f"gradguard: {plural(total, 'finding')} (mode={mode})"
    return title + "\n" + render_table(rows, colour=colour, width=width)


def install(
    mode: str = "warn",
    *,
    log_json: object = None,
    ignore: Iterable[str] | str | None = None,
    record_norms: bool = False,
) -> None:
    """Guard every optimizer this process steps from now on, with no other code change.

    For notebooks and for scripts that want it in one line at the top. A
    second call replaces the first. At `uninstall` or at exit, a summary of
    the findings goes to stderr.

    Args:
        mode: ``"warn"``, ``"strict"``, ``"log"``, or ``"off"`` (do nothing).
            Guards created with `gradguard.guard` and no ``mode=`` take it too.
        log_json: a file to receive one JSON object per finding per line; a
            ``{rank}`` in it becomes the process's rank. Created now.
        ignore: finding codes to silence, as a list or ``"GG101,GG103"``.
        record_norms: also write every step's gradient norms, total and per
            top-level module, to ``log_json`` (``gradguard report --plot``).

    Raises:
        TypeError: ``record_norms`` is not a bool.
        ValueError: unknown mode or code, ``log_json`` in a missing directory,
            or ``record_norms`` without ``log_json``.
    """
    setting = validate_setting(mode)
    codes = validate_codes(ignore)
    if not isinstance(record_norms, bool):
        raise TypeError(f"record_norms must be True or False; got {record_norms!r}")
    # Built first: a bad argument must leave any current session running.
    session = (
        None
        if setting == "off"
        else Session(setting, ignore=codes, log_json=log_json, record_norms=record_norms)
    )
    uninstall()
    if session is None:
        return
    global _INSTALLED
    _INSTALLED = session
    session.start()
    atexit.register(_at_exit)


def uninstall() -> list[SummaryRow]:
    """Stop what `install` started, print its summary and return it; idempotent.

    Guards created by `gradguard.guard` stay in place.
    """
    global _INSTALLED
    session, _INSTALLED = _INSTALLED, None
    if session is None:
        return []
    atexit.unregister(_at_exit)
    try:
        session.stop()
    finally:
        session.print_summary()
    return session.summary()


def _at_exit() -> None:
    try:
        uninstall()
    except Exception as exc:  # the interpreter is going away; say why, never hang
        print(f"gradguard: {type(exc).__name__}: {exc}", file=sys.stderr)
