"""Following child processes: the Python processes a run starts are guarded and report to it.

Parent side: `Follow` makes a private directory holding a copy of
``_startup.py`` as ``sitecustomize.py``, puts it first on ``PYTHONPATH`` and
describes the run (every guard option it sets, its own pid) in
``GRADGUARD_CHILDREN``, both in ``os.environ``, so every Python process
started from then on inherits them: multiprocessing's spawn and forkserver
children, ``subprocess`` runs of python, torchrun's workers. At the end,
`Follow.collect` reads what the children wrote there and removes it all.

Child side: the startup hook calls ``gradguard._session.on_child_step`` at
every optimizer step (and ``start_child`` when gradguard is imported), which,
where `settings` finds a run to report to, starts a `Session` whose
findings, norms and one ``watching`` record per optimizer go to
``<directory>/<pid>.jsonl``, written as they happen, so a child that dies
still leaves them. A process forked from a followed one (``fork`` children,
DataLoader workers) inherits its session, which `_after_fork_in_child` turns
into a fresh child session; nothing is written until it steps.
"""

from __future__ import annotations

import atexit
import dataclasses
import glob
import importlib.util
import json
import os
import py_compile
import shutil
import sys
import tempfile
import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

from gradguard._config import make_options
from gradguard._dispatch import Mode
from gradguard._findings import Finding
from gradguard._jsonlog import JsonLog
from gradguard._process import keep
from gradguard._report import ReportError, Run, load
from gradguard._startup import ENV_VAR
from gradguard._startup import say as _say

if TYPE_CHECKING:
    from gradguard._session import Session

_STARTUP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_startup.py")
_PATH_VAR = "PYTHONPATH"

# Sessions that follow children or report to a parent: a fork must re-point them.
_FOLLOWING: weakref.WeakSet[Session] = keep("following", weakref.WeakSet())


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a followed child needs to know of the run: from ``GRADGUARD_CHILDREN``."""

    directory: str
    options: Mapping[str, object]
    """Every guard option the run sets, checked: its mode always."""
    owner: int

    @property
    def mode(self) -> Mode:
        return cast(Mode, self.options["mode"])

    def to_env(self) -> str:
        options = {k: _jsonable(v) for k, v in self.options.items()}
        return json.dumps({"dir": self.directory, "options": options, "owner": self.owner})

    @classmethod
    def from_env(cls, text: str) -> Settings:
        data = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("dir"), str):
            raise ValueError(f"{ENV_VAR} holds no run directory: {text!r}")
        given = data.get("options")
        if not isinstance(given, dict) or "mode" not in given:
            raise ValueError(f"{ENV_VAR} holds no options: {text!r}")
        checked = make_options(**given)  # raises naming the bad option
        options = {name: getattr(checked, name) for name in given}
        return cls(directory=data["dir"], options=options, owner=int(data.get("owner", 0)))


def _jsonable(value: object) -> object:
    """An option's value as JSON holds it: the ignored codes as a sorted list."""
    return sorted(value) if isinstance(value, frozenset) else value


# -- parent side ---------------------------------------------------------------


class Follow:
    """From now on, Python processes started from this one are guarded and report to it."""

    def __init__(self, options: Mapping[str, object]) -> None:
        self.directory = tempfile.mkdtemp(prefix="gradguard-")
        hook = os.path.join(self.directory, "sitecustomize.py")
        try:
            shutil.copyfile(_STARTUP, hook)
            # Compiled once here, not in every child (PYTHONDONTWRITEBYTECODE would).
            py_compile.compile(hook, cfile=importlib.util.cache_from_source(hook), doraise=True)
        except BaseException:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise
        self._saved = {name: os.environ.get(name) for name in (ENV_VAR, _PATH_VAR)}
        self._value = Settings(self.directory, options, os.getpid()).to_env()
        path = self._saved[_PATH_VAR]
        os.environ[ENV_VAR] = self._value
        os.environ[_PATH_VAR] = self.directory + (os.pathsep + path if path else "")
        self._closed = False

    def collect(self) -> Run:
        """What every child wrote, after waiting for those the interpreter waits for at exit.

        Never raises: a child file that cannot be read counts as empty.
        """
        if self._closed:
            return Run(paths=[])
        _join_children()
        paths = sorted(glob.glob(os.path.join(self.directory, "*.jsonl")))
        try:
            run = load(paths)
        except ReportError:
            run = Run(paths=paths)
        self.close()
        return run

    def close(self) -> None:
        """Take this run out of ``os.environ`` and remove the directory; idempotent.

        What the program itself set in the meantime stays: only this run's
        entry leaves ``PYTHONPATH``, and the run's variable is put back only
        if it still describes this run.
        """
        if self._closed:
            return
        self._closed = True
        if os.environ.get(ENV_VAR) == self._value:
            _restore(ENV_VAR, self._saved[ENV_VAR])
        entries = os.environ.get(_PATH_VAR, "").split(os.pathsep)
        if self.directory in entries:
            rest = [e for e in entries if e != self.directory]
            _restore(_PATH_VAR, os.pathsep.join(rest) if rest else self._saved[_PATH_VAR])
        shutil.rmtree(self.directory, ignore_errors=True)


def _restore(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _join_children() -> None:
    """Wait for the non-daemonic multiprocessing children still running, as exit would.

    The interpreter joins them at exit anyway, after the summary would be
    printed; joining first lets their findings into it.
    """
    mp = sys.modules.get("multiprocessing")
    if mp is None:
        return
    for process in mp.active_children():
        if not process.daemon:
            process.join()


# -- child side ----------------------------------------------------------------


def settings() -> Settings | None:
    """The run this process reports to, when it is a followed child (not the run itself)."""
    text = os.environ.get(ENV_VAR)
    if not text:
        return None
    try:
        found = Settings.from_env(text)
    except (ValueError, TypeError) as exc:
        _say(f"runs unguarded: {ENV_VAR}={text[:80]!r} cannot be read: {exc}")
        return None
    if found.owner == os.getpid() or not os.path.isdir(found.directory):
        return None  # the run itself, or one that has ended
    return found


def track(session: Session) -> None:
    """Re-point ``session`` in children forked from now on."""
    _FOLLOWING.add(session)


def untrack(session: Session) -> None:
    _FOLLOWING.discard(session)


def _after_fork_in_child() -> None:
    try:
        for session in list(_FOLLOWING):
            session.forked()
    except Exception as exc:  # a fork must never fail for gradguard
        _say(f"runs unguarded: {type(exc).__name__}: {exc}")


os.register_at_fork(after_in_child=_after_fork_in_child)


class ChildLog:
    """A child's JSON-lines file in the run's directory, created at its first record.

    A child that never steps (a DataLoader worker) writes nothing. The file is
    closed at exit: by ``atexit``, and by multiprocessing's own exit, which
    skips ``atexit`` in fork and forkserver children.
    """

    def __init__(self, directory: str, closer: Callable[[], None]) -> None:
        self.directory = directory
        self._closer = closer
        self._log: JsonLog | None = None
        self._broken = False

    @property
    def path(self) -> str:
        return os.path.join(self.directory, f"{os.getpid()}.jsonl")

    def _open(self) -> JsonLog | None:
        if self._log is None and not self._broken:
            try:
                label = f"process {os.getpid()}'s report to the run that started it ({self.path})"
                self._log = JsonLog(self.path, "the run's directory", label)
            except (OSError, ValueError) as exc:  # the run ended and removed it
                self._broken = True
                _say(
                    f"cannot report to the run that started it ({exc}): its findings are "
                    "not in the run's log or summary"
                )
                return None
            atexit.register(self._closer)
            util = sys.modules.get("multiprocessing.util")
            if util is not None:
                util.Finalize(None, self._closer, exitpriority=-10)
        return self._log

    def __call__(self, finding: Finding, first: bool) -> None:
        log = self._open()
        if log is not None:
            log(finding, first)

    def write_record(self, obj: dict[str, Any]) -> None:
        log = self._open()
        if log is not None:
            log.write_record(obj)

    def watching(self) -> None:
        """Record at once that this process stepped an optimizer: the parent counts them."""
        log = self._open()
        if log is not None:
            log.write_event({"event": "watching"})

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
