"""Process-wide activation: guard every optimizer the process steps, with no code change.

A `Session` registers torch's global optimizer step pre-hook, which runs for
every optimizer at every step. The first time it sees an optimizer it attaches
a guard; that guard's own step hooks are registered while torch is still
calling the global ones, and torch calls them in the same step. The guard skips
judging that first step: the backward before it ran before any hook existed.

Used by `gradguard.install`, ``gradguard run`` and the pytest plugin. The
first two also follow the Python processes the program starts
(``gradguard._children``): their findings join this session's log and summary.
In such a child, the startup hook starts its own session here (`start_child`).
"""

from __future__ import annotations

import atexit
import os
import sys
import weakref
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, TextIO, cast

from torch.optim.optimizer import register_optimizer_step_pre_hook

from gradguard import _children
from gradguard._children import ChildLog, Follow
from gradguard._compiled import untraced
from gradguard._config import (
    BY_NAME,
    GUARD_OPTIONS,
    activate,
    deactivate,
    passed,
    session_defaults,
    unset,
)
from gradguard._dispatch import Mode, SinkHandle, _log, add_record_sink, add_sink
from gradguard._findings import Finding
from gradguard._jsonlog import JsonLog, now
from gradguard._naming import REGISTRATIONS
from gradguard._process import keep
from gradguard._report import Record, Run, plural, render_table, wants_colour, width_for
from gradguard._sources import Given, from_values, unknown_names
from gradguard._startup import say as say_once
from gradguard._stderr import say
from gradguard._tally import SummaryRow, Tally

if TYPE_CHECKING:
    import torch
    from torch.utils.hooks import RemovableHandle

    from gradguard._guard import Guard


class _Sessions:
    """The process's own sessions: `install`'s, and a followed child's."""

    def __init__(self) -> None:
        self.installed: Session | None = None
        self.child: Session | None = None  # the session the startup hook started here
        self.left = False  # this process stopped reporting to its parent run

    def clear(self) -> None:
        """Stop both without a summary (a reset for tests)."""
        installed, child, self.installed, self.child = self.installed, self.child, None, None
        self.left = False
        atexit.unregister(_at_exit)
        for session in (installed, child):
            if session is not None:
                session.stop_quietly()

    def __len__(self) -> int:
        return (self.installed is not None) + (self.child is not None)


_SESSIONS = keep("sessions", _Sessions())


class Session:
    """Guards every optimizer stepped while it is active, and counts what they find.

    It owns the guards it attached and closes them on `stop`; guards the user
    created with `gradguard.guard` stay with the user, but their findings are
    counted and logged here too.

    With ``follow=True`` the Python processes started while it is active are
    guarded as well and report to it (see ``gradguard._children``); with
    ``child_of=DIRECTORY`` it is such a child's session, writing to its file
    in that directory and printing no summary of its own. ``log_source``
    names ``log_json`` in the error a bad path raises (``--log-json``).

    ``options`` are the guard options it gives the guards created while it
    is active (checked where they were set), besides ``mode``; those it
    leaves out come from the session around it, if any, else their defaults.
    """

    def __init__(
        self,
        mode: Mode,
        *,
        options: Mapping[str, object] | None = None,
        log_json: object = None,
        log_source: str = "log_json",
        verbose: bool = False,
        follow: bool = False,
        child_of: str | None = None,
    ) -> None:
        self.options: dict[str, object] = {**(options or {}), "mode": mode}
        self.mode: Mode = mode
        self.verbose = verbose
        self.findings: list[Finding] = []
        self.optimizers = 0
        # Stamped: a code's first occurrence here is ordered among the children's.
        self._tally = Tally(clock=now)
        self._owned: weakref.WeakSet[Guard] = weakref.WeakSet()
        self._seen: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
        self._log: JsonLog | ChildLog | None
        if child_of is not None:
            self._log = ChildLog(child_of, self.stop_quietly)
        else:
            self._log = None if log_json is None else JsonLog(log_json, log_source)
        self._hook: RemovableHandle | None = None
        self._sinks: list[SinkHandle] = []
        self._wants_follow = follow
        self._follow: Follow | None = None
        self._children = Run(paths=[])
        self.child_strict: Record | None = None
        """In strict mode, the first finding a followed child raised (known after `stop`)."""
        self.active = False

    @property
    def log_path(self) -> str | None:
        """The JSON-lines file this session writes, if any."""
        return None if self._log is None else self._log.path

    @property
    def is_child(self) -> bool:
        """Whether this session reports to a parent run rather than to the user."""
        return isinstance(self._log, ChildLog)

    def start(self, *, global_hook: bool = True) -> None:
        """Begin guarding every optimizer at its next step.

        Args:
            global_hook: register torch's global step pre-hook; a followed
                child's startup hook calls `discover` itself instead.
        """
        if self.active:
            return
        self.active = True
        self._sinks.append(add_sink(self._on_finding))
        if self._log is not None:
            self._sinks.append(add_sink(self._log_finding))
            self._sinks.append(add_record_sink(self._log_record))
        if global_hook:
            self._hook = register_optimizer_step_pre_hook(self._discover)
        REGISTRATIONS.start()  # name parameters without walking the heap
        if self._wants_follow:
            try:
                # What the guards here get, the children's get: this session's
                # options over those of the sessions around it.
                self._follow = Follow({**session_defaults(), **self.options})
            except Exception as exc:  # say why, and let the script run all the same
                _log().warning(
                    "children-not-followed",
                    error=f"{type(exc).__name__}: {exc}",
                    note="processes this one starts run unguarded",
                )
        if self._follow is not None or self.is_child:
            _children.track(self)
        activate(self)

    # The log is looked up at each call: a fork replaces it (`forked`).
    def _log_finding(self, finding: Finding, first: bool) -> None:
        if self._log is not None:
            self._log(finding, first)

    def _log_record(self, obj: dict[str, Any]) -> None:
        if self._log is not None:
            self._log.write_record(obj)

    def stop(self) -> None:
        """Stop discovering optimizers and close the guards this session attached.

        Every guard is closed even if one raises; the first `GradGuardError`
        (a strict-mode finding that was still being computed on the device)
        is raised once everything is cleaned up.
        """
        if not self.active:
            return
        self.active = False
        deactivate(self)
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        REGISTRATIONS.stop()
        error: BaseException | None = None
        try:
            error = self._settle()
            for g in list(self._owned):
                try:
                    g.close()
                except Exception as exc:
                    error = error or exc
        finally:
            for handle in reversed(self._sinks):
                handle.remove()
            self._sinks.clear()
            _children.untrack(self)
            if self._follow is not None:
                self._absorb(self._follow.collect())
                self._follow = None
            if self._log is not None:
                self._log.close()
        if error is not None:
            raise error

    def settle(self) -> None:
        """Judge every guard's pending device results now (`Guard.settle`)."""
        error = self._settle()
        if error is not None:
            raise error

    @staticmethod
    def _settle() -> Exception | None:
        """Settle every live guard, the user's own too: their findings reach this
        session's sinks while it has them. Returns the strict finding raised, if any."""
        from gradguard._api import settle_all

        try:
            settle_all()
        except Exception as exc:  # GradGuardError: a strict finding
            return exc
        return None

    def stop_quietly(self) -> None:
        """`stop`, for a followed child at exit: what it found is already in its file."""
        try:
            self.stop()
        except Exception as exc:  # GradGuardError included: its record was written first
            if getattr(exc, "finding", None) is None:
                say(f"gradguard: {type(exc).__name__}: {exc}")

    def _absorb(self, children: Run) -> None:
        """Take in what the followed children wrote: into the log, the summary, the verdict."""
        self._children = children
        if isinstance(self._log, JsonLog):
            self._log.absorb(children.findings, children.norms, children.tally.counts)
        if self.mode == "strict":
            raised = [r for r in children.findings if r.get("level") in ("warning", "error")]
            if raised:
                self.child_strict = min(raised, key=lambda r: str(r.get("timestamp", "")))

    def forked(self) -> None:
        """In a process just forked from this one: report to the run's directory from now on.

        The fork inherited this session, guards and all; what the parent found
        stays the parent's, so counting starts afresh and goes to this
        process's own file, opened at its first record.
        """
        if self._follow is not None:
            directory = self._follow.directory
        elif isinstance(self._log, ChildLog):
            directory = self._log.directory
        else:
            return
        self._follow = None
        self._log = ChildLog(directory, self.stop_quietly)
        self.findings = []
        self.optimizers = 0
        self._tally = Tally(clock=now)
        self._children = Run(paths=[])

    def discover(self, opt: torch.optim.Optimizer) -> None:
        """Guard ``opt`` from its next step on, if it is new to this session."""
        self._discover(opt, (), {})

    @untraced  # attaching is bookkeeping, never part of a compiled step
    def _discover(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if opt in self._seen:
            return
        self._seen.add(opt)
        self.optimizers += 1
        if isinstance(self._log, ChildLog):
            self._log.watching()
        try:
            from gradguard._api import attach, guard_of

            if guard_of(opt) is None:
                # Every option from the active sessions: as for a guard() without arguments.
                g = attach(opt, judge_first_step=False)
                self._owned.add(g)
        except Exception as exc:  # never break the user's step
            _log().error(
                "internal-error",
                where="optimizer discovery",
                error=f"{type(exc).__name__}: {exc}",
                note=f"gradguard does not watch {type(opt).__name__}; training continues",
            )

    def watched(self) -> list[torch.optim.Optimizer]:
        """The live optimizers this session has seen step."""
        return list(self._seen)

    def _on_finding(self, finding: Finding, first: bool) -> None:
        if first:
            self.findings.append(finding)
        self._tally.add(finding)

    def summary(self) -> list[SummaryRow]:
        """Per code: how often it fired while active, and where and how it first did.

        After `stop`, the followed children's findings are counted in, and the
        first occurrence is the earliest in any process.
        """
        tally = Tally()
        tally.merge(self._children.tally)  # first, so that on a tie the child's is kept
        tally.merge(self._tally)
        return tally.rows()

    def print_summary(self, file: TextIO | None = None) -> None:
        """Write the summary to stderr; nothing when nothing was found, unless verbose.

        When no optimizer stepped in the whole run, it says so. A followed
        child prints nothing: its parent's summary counts it.
        """
        if self.is_child:
            return
        stream = sys.stderr if file is None else file
        children = self._children
        text = format_summary(
            self.summary(),
            self.mode,
            self.optimizers + children.watched,
            self.verbose,
            colour=wants_colour(stream),
            width=width_for(stream),
            in_children=InChildren(
                findings=sum(children.tally.counts.values()),
                finding_processes=len({r.get("pid") for r in children.findings}),
                optimizers=children.watched,
                stepping_processes=len(children.stepping - {os.getpid()}),
            ),
        )
        if text and file is None:
            say(text)  # a broken stderr loses the summary, never the job
        elif text:
            print(text, file=stream, flush=True)


NOTHING_STEPPED = "gradguard: no optimizer stepped in this run (nothing was checked)"


class InChildren(NamedTuple):
    """How much of a run happened in the child processes it followed."""

    findings: int = 0
    finding_processes: int = 0
    optimizers: int = 0
    stepping_processes: int = 0


_NONE_IN_CHILDREN = InChildren()


def format_summary(
    rows: list[SummaryRow],
    mode: str,
    optimizers: int,
    verbose: bool,
    *,
    colour: bool = False,
    width: int = 100,
    in_children: InChildren = _NONE_IN_CHILDREN,
) -> str:
    """The end-of-run summary: a title, then the table ``gradguard report`` prints too.

    Args:
        optimizers: how many optimizers stepped in the run, children included.
        in_children: how many of the findings and optimizers were in followed
            child processes, and in how many of them.
    """
    there = in_children
    if not rows:
        if not optimizers:
            return NOTHING_STEPPED
        if not verbose:
            return ""
        watched = plural(optimizers, "optimizer") + " watched"
        where = _where(there.optimizers, optimizers, there.stepping_processes)
        return f"gradguard: no findings (mode={mode}, {watched}{where})"
    total = sum(r.count for r in rows)
    where = _where(there.findings, total, there.finding_processes)
    title = f"gradguard: {plural(total, 'finding')} (mode={mode}{where})"
    return title + "\n" + render_table(rows, colour=colour, width=width)


def _where(part: int, total: int, processes: int) -> str:
    """``, in 2 child processes`` or ``, 3 of them in 1 child process``; empty for none."""
    if not part or not processes:
        return ""
    where = f"in {processes} child process{'es' if processes != 1 else ''}"
    return f", {where}" if part == total else f", {part} of them {where}"


# -- a followed child's own session ---------------------------------------------


def start_child() -> Session | None:
    """Start this child's session if it is a followed child and has none yet."""
    if _SESSIONS.child is not None or _SESSIONS.left:
        return _SESSIONS.child
    found = _children.settings()
    if found is None:  # not followed, or unreadable: said once, never tried again
        _SESSIONS.left = True
        return None
    session = Session(found.mode, options=found.options, child_of=found.directory)
    # Not a hook of its own: this may run inside torch's loop over the global hooks.
    session.start(global_hook=False)
    _SESSIONS.child = session
    return session


def on_child_step(opt: Any, args: Any, kwargs: Any) -> None:
    """The startup hook's step pre-hook: discover ``opt`` in this child's session."""
    try:
        session = start_child()
        if session is not None and session.active:
            session.discover(opt)
    except Exception as exc:  # never break the child's step
        _SESSIONS.left = True
        say_once(f"runs unguarded from now on: {type(exc).__name__}: {exc}")


def leave_parent_run() -> None:
    """Stop reporting to the parent run: an explicit `install` or ``gradguard run`` here wins."""
    if _SESSIONS.child is None and _children.settings() is None:
        return  # not a followed child
    _SESSIONS.left = True
    session, _SESSIONS.child = _SESSIONS.child, None
    if session is not None:
        session.stop_quietly()


def install(
    mode: str = "warn",
    *,
    log_json: object = None,
    ignore: Iterable[str] | str | None = None,
    record_norms: bool = unset("record_norms"),
    accumulation_steps: int | None = unset("accumulation_steps"),
    check_numerics: bool = unset("check_numerics"),
    numerics_every: int | None = unset("numerics_every"),
    explode_factor: float = unset("explode_factor"),
    max_grad_norm: float | None = unset("max_grad_norm"),
    unused_after: int = unset("unused_after"),
    check_ranks_every: int | None = unset("check_ranks_every"),
) -> None:
    """Guard every optimizer this process steps from now on, with no other code change.

    For notebooks and for scripts that want it in one line at the top. A
    second call replaces the first. At `uninstall` or at exit, a summary of
    the findings goes to stderr. Python processes started from then on
    (multiprocessing's spawn and forkserver children, ``subprocess``) are
    guarded too, with these settings, and counted in that summary and log.

    Called in a process that a run follows (a spawned worker re-running the
    script's top), it keeps reporting to that run, with these settings; the
    run's log gets its findings, so ``log_json`` is not opened there.

    Args:
        mode: ``"warn"``, ``"strict"``, ``"log"``, or ``"off"`` (do nothing).
            Guards created with `gradguard.guard` and no ``mode=`` take it too.
        log_json: a file to receive one JSON object per finding per line; a
            ``{rank}`` in it becomes the process's rank. Created now.
        ignore: finding codes to silence, as a list or ``"GG101,GG103"``.
        record_norms: also write every step's gradient norms, total and per
            top-level module, to ``log_json`` (``gradguard report --plot``).
        accumulation_steps, check_numerics, numerics_every, explode_factor,
            max_grad_norm, unused_after, check_ranks_every: as for
            `gradguard.guard`, for every guard created while installed that
            does not set them itself. One left out here is that of the
            session around this one (``gradguard run``, the pytest plugin),
            else its default.

    Raises:
        TypeError: an argument has the wrong type (``ignore=5``, ``log_json=3``,
            ``record_norms=1``, ``mode=None``).
        ValueError: unknown mode or code, ``log_json`` in a missing directory,
            naming a directory or one the system refuses to create, an
            out-of-range option, or ``record_norms`` without ``log_json``.
            Either way the session already running, if any, is left as it was.
    """
    arguments = dict(locals())
    _install(arguments, summary=True)


def install_quietly(mode: str = "warn") -> None:
    """`install` with ``mode`` alone, printing no summary of the session it replaces.

    For the notebook extension, which counts findings across its mode changes
    and prints its summary when asked.

    Raises:
        ValueError: unknown mode; the session running, if any, is left as it was.
    """
    _install({"mode": mode}, summary=False)


_INSTALL_OPTIONS = (*GUARD_OPTIONS, BY_NAME["log_json"])


def _checked_install(arguments: Mapping[str, object]) -> Given:
    """`install`'s arguments checked, each error naming the argument as `guard`'s do."""
    given = {**passed(arguments), "mode": arguments["mode"]}  # install always sets a mode
    unknown_names(given, "install()", _INSTALL_OPTIONS)
    checked = from_values(given, lambda o: o.name, "install()", options=_INSTALL_OPTIONS)
    if checked.values.get("record_norms") and "log_json" not in checked.values:
        raise ValueError(
            "record_norms=True needs log_json=PATH: the norms are written to the JSON log"
        )
    return checked


def _install(arguments: Mapping[str, object], *, summary: bool) -> None:
    """`install`'s work; with ``summary``, the session replaced prints its summary."""
    checked = _checked_install(arguments)
    setting = checked.values["mode"]  # checked: a mode, or "off"
    options = checked.guard_options()
    del options["mode"]
    log_json = checked.values.get("log_json")
    parent = _children.settings()
    # Built first: a bad argument must leave any current session running.
    session: Session | None = None
    if setting == "off":
        pass
    elif parent is not None:
        options = {**parent.options, **options}  # what this call leaves out, the run decides
        session = Session(cast(Mode, setting), options=options, child_of=parent.directory)
    else:
        session = Session(cast(Mode, setting), options=options, log_json=log_json, follow=True)
    if summary:
        uninstall()
    else:
        stop_installed()
    if parent is not None:
        leave_parent_run()
    if session is None:
        return
    _SESSIONS.installed = session
    session.start()
    atexit.register(_at_exit)


def uninstall() -> list[SummaryRow]:
    """Stop what `install` started, print its summary and return it; idempotent.

    Guards created by `gradguard.guard` stay in place.
    """
    session = _SESSIONS.installed
    if session is None:
        return []
    try:
        stop_installed()
    finally:
        session.print_summary()
    return session.summary()


def stop_installed() -> Session | None:
    """Stop what `install` started, printing nothing; return the session stopped, if any.

    Raises what `Session.stop` raises, once the session is stopped.
    """
    session, _SESSIONS.installed = _SESSIONS.installed, None
    if session is None:
        return None
    atexit.unregister(_at_exit)
    session.stop()
    return session


def installed() -> Session | None:
    """The session `install` started, while it runs."""
    return _SESSIONS.installed


def _at_exit() -> None:
    try:
        uninstall()
    except Exception as exc:  # the interpreter is going away; say why, never hang
        say(f"gradguard: {type(exc).__name__}: {exc}")
