"""The one place a `Finding` becomes a log event, a warning or an exception."""

from __future__ import annotations

import functools
import itertools
import re
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, cast

from gradguard._exceptions import ERRORS, WARNINGS, GradGuardInternalError, GradGuardWarning
from gradguard._findings import CATALOGUE, Finding
from gradguard._jsonlog import _distributed
from gradguard._process import keep
from gradguard._stderr import say
from gradguard._tally import SummaryRow, Tally

Mode = Literal["warn", "strict", "log"]
MODES: tuple[Mode, ...] = ("warn", "strict", "log")

Sink = Callable[[Finding, bool], None]
"""Receives ``(finding, first)`` for every finding any guard reports, repeats included;
``first`` is false when the finding repeats one already emitted."""

_SINKS: dict[int, Sink] = keep("sinks", {})
_SINK_IDS = itertools.count()

RecordSink = Callable[[dict[str, Any]], None]
"""Receives records that are not findings, such as a step's gradient norms."""

_RECORD_SINKS: dict[int, RecordSink] = keep("record sinks", {})


class SinkHandle:
    """What `add_sink` (and `add_record_sink`) returns: ``remove()`` stops the sink, and
    is idempotent.

    Also a context manager: ``with gradguard.add_sink(sink):`` removes the
    sink when the block ends, however it ends.
    """

    def __init__(self, key: int, registry: dict[int, Any] = _SINKS) -> None:
        self._key = key
        self._registry = registry

    def remove(self) -> None:
        """Stop sending anything to the sink; calling it again does nothing."""
        self._registry.pop(self._key, None)

    def __enter__(self) -> SinkHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


def add_sink(sink: Sink) -> SinkHandle:
    """Send every finding any guard in the process reports, from now on, to ``sink``.

    ``sink(finding, first)`` is called each time a finding fires, with the
    finding as it fired then (its step, its parameters). ``first`` is true
    the first time its guard reports that code at that place: when it is
    warned, logged or raised; a repeat is only counted, and ``first`` is
    false. Findings of codes a guard ignores never reach it.

    Sinks run before the finding is logged, warned or raised, so a strict-mode
    finding still reaches them. A sink may be called from any thread that
    steps an optimizer. A sink that raises is removed and logged once; it
    never breaks the training step.

    Returns:
        A `SinkHandle`: ``handle.remove()``, or use it as a context manager.

    Raises:
        TypeError: ``sink`` is not callable.
    """
    if not callable(sink):
        raise TypeError(
            f"add_sink() needs a callable taking (finding, first); got {type(sink).__name__}"
        )
    key = next(_SINK_IDS)
    _SINKS[key] = sink
    return SinkHandle(key)


def add_record_sink(sink: RecordSink) -> SinkHandle:
    """Send every record that is not a finding (``record_norms``) to ``sink(record)``.

    Such records go to JSON logs only: one per step is too many for a
    console or for Python warnings.
    """
    key = next(_SINK_IDS)
    _RECORD_SINKS[key] = sink
    return SinkHandle(key, _RECORD_SINKS)


def has_record_sinks() -> bool:
    """Whether any record sink would receive `emit_record`'s records."""
    return bool(_RECORD_SINKS)


def emit_record(record: dict[str, Any]) -> None:
    """Hand ``record`` to every record sink; one that raises is removed and logged once."""
    for key, sink in list(_RECORD_SINKS.items()):
        try:
            sink(record)
        except Exception as exc:
            _RECORD_SINKS.pop(key, None)
            _log().error(
                "sink-error",
                sink=repr(sink),
                error=f"{type(exc).__name__}: {exc}",
                note="gradguard removed this sink; training continues unchanged",
            )


def _notify(finding: Finding, first: bool) -> None:
    for key, sink in list(_SINKS.items()):
        try:
            sink(finding, first)
        except Exception as exc:
            _SINKS.pop(key, None)
            _log().error(
                "sink-error",
                sink=repr(sink),
                error=f"{type(exc).__name__}: {exc}",
                note="gradguard removed this sink; training continues unchanged",
            )


def validate_choice(value: object, allowed: Sequence[str], source: str) -> str:
    """Return ``value`` if it is in ``allowed``; else raise naming it, ``source`` and ``allowed``.

    Raises:
        TypeError: ``value`` is not a str.
        ValueError: it is a str, but not one of ``allowed``.
    """
    if isinstance(value, str) and value in allowed:
        return value
    error = ValueError if isinstance(value, str) else TypeError
    raise error(f"{source} must be one of {', '.join(allowed)}; got {value!r}")


def validate_mode(mode: object, source: str = "mode") -> Mode:
    """Return ``mode`` if it is a known mode, else raise naming ``source``."""
    return cast(Mode, validate_choice(mode, MODES, source))


def validate_codes(codes: object, source: str = "ignore") -> frozenset[str]:
    """Return ``codes`` as a set after checking each one is in the catalogue.

    ``codes`` is ``None``, a str such as ``"GG101,GG103"`` or an iterable of str.
    """
    if codes is None:
        return frozenset()
    if isinstance(codes, str):
        codes = [c for c in re.split(r"[\s,]+", codes) if c]
    elif isinstance(codes, (bytes, bytearray)) or not isinstance(codes, Iterable):
        raise TypeError(
            f"{source} must be finding codes, a str such as 'GG101,GG103' or a list of str; "
            f"got {codes!r}"
        )
    out = set()
    for code in codes:
        if not isinstance(code, str):
            raise TypeError(f"{source} must hold finding codes as str; got {code!r}")
        if code.upper() not in CATALOGUE:
            known = ", ".join(sorted(CATALOGUE))
            raise ValueError(f"{source} names unknown finding code {code!r}; known codes: {known}")
        out.add(code.upper())
    return frozenset(out)


class Reporter:
    """Deduplicates findings and emits each new one according to the mode."""

    def __init__(self, mode: Mode, ignore: frozenset[str]) -> None:
        self.mode = mode
        self.ignore = ignore
        self.counts: dict[Finding, int] = {}
        self._by_key: dict[tuple[str, str, str], Finding] = {}
        # Called with every occurrence, before deduplication (tests, recorders).
        self.listeners: list[Callable[[Finding], None]] = []
        self._lock = threading.Lock()

    @property
    def findings(self) -> list[Finding]:
        """Each distinct finding once, in the order first seen."""
        return list(self.counts)

    def report(self, finding: Finding, filename: str, lineno: int) -> None:
        """Record ``finding``; emit it the first time it is seen at this place."""
        if finding.code in self.ignore:
            return
        for listener in self.listeners:
            listener(finding)
        # One report per code and place: a NaN that spreads to more parameters
        # on the next step is the same problem, counted, not reported again.
        key = (finding.code, finding.optimizer, finding.location)
        with self._lock:
            first = self._by_key.get(key)
            if first is not None:
                self.counts[first] += 1
            else:
                self._by_key[key] = finding
                self.counts[finding] = 1
        if first is not None:
            _notify(finding, False)  # this occurrence: its own step and parameters
            return
        _notify(finding, True)
        self._emit(finding, filename, lineno)

    def _emit(self, finding: Finding, filename: str, lineno: int) -> None:
        emit_event(finding, console=self.mode != "warn")
        if self.mode == "warn":
            try:
                _warn(finding, filename, lineno)
            except GradGuardWarning:
                raise  # the user's filters made it an error (-W error): theirs to see
            except Exception as exc:  # showing it failed (a closed stderr, the user's showwarning)
                say(f"gradguard: {finding.message} (showing it as a warning failed: {exc!r})")
        elif self.mode == "strict" and finding.level != "info":
            raise ERRORS[finding.code](finding.message, finding)

    def summary(self) -> list[SummaryRow]:
        """Per code: how often it fired, and where and how it first did."""
        tally = Tally()
        # `counts` keeps the order first seen: a code's first finding is added first.
        for finding, count in self.counts.items():
            tally.add(finding, count)
        return tally.rows()

    def internal_error(self, exc: BaseException, where: str) -> None:
        """Log gradguard's own failure once; in strict mode raise it."""
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        error = f"{type(exc).__name__}: {exc}"
        note = "gradguard disabled this guard; training continues unchanged"
        _send(
            "error",
            "internal-error",
            {"where": where, "error": error, "traceback": text, "note": note},
            plain=f"gradguard: internal-error in {where}: {error}; {note}\n{text}",
        )
        if self.mode == "strict":
            raise GradGuardInternalError(
                f"gradguard failed internally in {where} ({type(exc).__name__}: {exc}) "
                "and disabled this guard; please report this with the traceback."
            ) from exc


def emit_event(finding: Finding, *, console: bool) -> None:
    """Send ``finding`` through structlog as a stable, keyed event.

    A user who configured structlog gets the event through their own pipeline.
    Otherwise it goes to a readable line on stderr (never stdout, which belongs
    to the user's program), unless ``console`` is false because a Python
    warning already shows it.
    """
    if not console and not _configured():
        return
    fields = {
        "code": finding.code,
        "step": finding.step,
        "optimizer": finding.optimizer,
        "params": list(finding.params),
        "location": finding.location,
        **({"written_at": finding.written_at} if finding.written_at else {}),
        **({"cleared_at": finding.cleared_at} if finding.cleared_at else {}),
        "hint": finding.hint,
        # not "message": the stdlib logging bridge refuses to overwrite LogRecord.message
        "report": finding.message,
        **_rank_fields(),
    }
    _send(finding.level, finding.name, fields, plain=f"gradguard: {finding.message}")


def emit_info(event: str, **fields: Any) -> None:
    """Log an informational event that is not a finding, such as a skipped AMP step."""
    _send("info", event, {**fields, **_rank_fields()})


def _rank_fields() -> dict[str, int]:
    """``rank`` and ``world_size`` under ``torch.distributed``, so each rank's lines tell apart."""
    dist = _distributed()
    return {} if dist is None else {"rank": dist[0], "world_size": dist[1]}


def _send(method: str, event: str, fields: dict[str, Any], plain: str | None = None) -> None:
    """Log ``event`` through the user's structlog pipeline if configured, else to stderr.

    Never raises. A pipeline that raises is the user's to fix, not a reason
    to lose the event: it goes to stderr as one ``plain`` line (by default
    the event and its fields), and the failure is said once per pipeline.
    """
    if _configured():
        try:
            getattr(_pipeline_logger(), method)(event, **fields)
        except Exception as exc:
            _pipeline_failed(exc, event)
            say(plain if plain is not None else _plain(event, fields))
        return
    try:
        getattr(_console(), method)(event, **fields)
    except Exception:  # gradguard's own console cannot render it: the plain line, then
        say(plain if plain is not None else _plain(event, fields))


def _configured() -> bool:
    """Whether the user configured structlog, found out without importing it.

    A process that never imported structlog has not configured it. structlog
    takes longer to import than the rest of gradguard, so it is imported only
    to send an event: ``gradguard --help`` and ``report`` never import it, and
    neither does a finding that Python shows as a warning.
    """
    structlog = sys.modules.get("structlog")
    return structlog is not None and bool(structlog.is_configured())


@functools.cache
def _pipeline_logger() -> Any:
    """gradguard's logger in the user's structlog pipeline, made at the first event sent there."""
    import structlog

    return structlog.get_logger("gradguard")


def _plain(event: str, fields: dict[str, Any]) -> str:
    """``gradguard: event key=value ...``: an event as one line, with no pipeline."""
    return " ".join([f"gradguard: {event}", *(f"{k}={v}" for k, v in fields.items())])


# The configuration whose failure was said.
_FAILED_PIPELINE: list[object] = keep("failed log pipeline", [], cache=True)
_FAILED_LOCK = threading.Lock()


def _pipeline_failed(exc: Exception, event: str) -> None:
    """Say once per structlog configuration that it raised, and where."""
    import structlog  # imported already: the user configured it

    config = structlog.get_config()
    pipeline = [config["processors"], config["logger_factory"], config["wrapper_class"]]
    with _FAILED_LOCK:
        if len(_FAILED_PIPELINE) == len(pipeline) and all(
            a is b for a, b in zip(_FAILED_PIPELINE, pipeline, strict=True)
        ):
            return
        _FAILED_PIPELINE[:] = pipeline
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    say(
        f"gradguard: your structlog configuration raised {type(exc).__name__}: {exc}{where} "
        f"on gradguard's {event!r} event; gradguard writes the events it cannot take to "
        "stderr instead; training continues unchanged"
    )


class _Logger:
    """gradguard's logger: `_send` for each event, so logging never fails the job."""

    def info(self, event: str, **fields: Any) -> None:
        _send("info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        _send("warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        _send("error", event, fields)


_LOGGER = _Logger()


def _log() -> _Logger:
    """The logger for gradguard's events: the user's structlog pipeline or stderr."""
    return _LOGGER


@functools.cache
def _console() -> Any:
    """The stderr console logger used while structlog is not configured."""
    import structlog  # here, at the first event logged: a run with none never imports it

    return structlog.wrap_logger(
        _StderrLogger(),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="%H:%M:%S"),
            structlog.dev.ConsoleRenderer(colors=False),
        ],
    ).bind(logger="gradguard")


class _StderrLogger:
    """Writes each rendered line to the current ``sys.stderr``, looked up per call."""

    def msg(self, message: str) -> None:
        say(message)

    info = warning = error = debug = critical = msg


def _warn(finding: Finding, filename: str, lineno: int) -> None:
    """Warn ``finding`` as if the user's code at ``filename:lineno`` had called `warnings.warn`.

    The warning's module is the ``__name__`` that code ran under (``mypkg.train``,
    ``__main__``), and that module's ``__warningregistry__`` and globals go with
    it, so ``-W``, ``filterwarnings(module=...)``, ``once`` and ``default`` treat
    it as theirs. Where the module is not known, the file's name stands for it.
    """
    category = WARNINGS[finding.code]
    module, namespace = _origin(filename)
    registry = None
    if namespace is not None:
        registry = namespace.setdefault("__warningregistry__", {})
        if not isinstance(registry, dict):  # not the registry warnings would keep there
            registry = namespace = None
    try:
        warnings.warn_explicit(
            category(finding), category, filename, lineno, module, registry, namespace
        )
    except GradGuardWarning:
        raise
    except Exception:
        if namespace is None:
            raise
        # The module's loader failed to give its source line: warn without it.
        warnings.warn_explicit(category(finding), category, filename, lineno, module, registry)


def _origin(filename: str) -> tuple[str, dict[str, Any] | None]:
    """The module name and globals `_warn` uses for a line of ``filename``; never raises."""
    try:
        # Only a guard reports a finding: torch, and the names, are imported by then.
        from gradguard._naming import warning_origin

        name, namespace = warning_origin(filename)
    except Exception:
        name, namespace = None, None
    if name is None:
        base = filename.rsplit("/", 1)[-1]
        name = base[:-3] if base.endswith(".py") else base
    return name, namespace
