"""The JSON-lines file: one object per finding, for log shippers and CI artefacts.

Every finding record holds ``code``, ``event``, ``level``, ``step``,
``optimizer``, ``params``, ``location``, ``hint``, ``doc``, ``message``,
``timestamp`` and ``pid`` (the process that made it: a followed child's own),
plus ``rank`` and ``world_size`` when ``torch.distributed`` is initialised.
When the log closes after findings, one ``"event": "summary"`` record gives
how often each code fired, repeats included, for ``gradguard report``.

A log that cannot be written (a full disk, a reader gone from a pipe, a
directory removed under it) never fails the job: writing stops, and when the
log closes one line on stderr says what was lost.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any

from gradguard._findings import Finding
from gradguard._stderr import say
from gradguard._tally import Tally

RANK_PLACEHOLDER = "{rank}"
# Per-step records (record_norms) are written in batches, so that a step pays
# for a list append rather than a system call; a crash loses at most a second.
_BATCH_SECONDS = 1.0
_BATCH_LINES = 256


def _distributed() -> tuple[int, int] | None:
    """``(rank, world_size)`` when torch.distributed is initialised, else ``None``."""
    # Looked up, not imported: a process that never imported torch has no process
    # group, and writing a log must not cost it the import.
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return None


def _start_rank() -> int:
    """This process's rank when logging starts, usually before the process group exists.

    torchrun exports ``RANK`` before the script runs, so it names the file
    long before ``init_process_group`` is called.
    """
    dist = _distributed()
    if dist is not None:
        return dist[0]
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def resolve_path(path: object, source: str = "log_json") -> str:
    """Return ``path`` with ``{rank}`` filled in, checking it can be written.

    Raises:
        TypeError: ``path`` is not a str or path-like.
        ValueError: its directory does not exist, or it names a directory.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{source} must be a file path (str or os.PathLike); got {path!r}")
    raw = os.fspath(path)
    if not isinstance(raw, str) or not raw:
        raise ValueError(f"{source} must be a non-empty file path; got {path!r}")
    resolved = raw.replace(RANK_PLACEHOLDER, str(_start_rank()))
    directory = os.path.dirname(resolved) or "."
    if not os.path.isdir(directory):
        raise ValueError(
            f"{source} must be a file path in an existing directory; got {raw!r}, "
            f"and directory {directory!r} does not exist: create it first"
        )
    if os.path.isdir(resolved):
        raise ValueError(
            f"{source} must be a file path such as out.jsonl, not a directory; got {raw!r}"
        )
    return resolved


class JsonLog:
    """A sink that appends one JSON object per new finding to a file.

    The file is created (or emptied) when the log is opened, so its presence
    shows that gradguard ran even when nothing was found. Each write appends
    whole lines, so several processes sharing a path interleave whole lines.
    A finding is written at once; per-step records are batched.

    Once a write fails, nothing more is written (the file would hold
    fragments); the records are counted instead, and `close` says once on
    stderr what was lost and why. ``label`` names the log in that line.

    Raises:
        TypeError, ValueError: ``path`` is no file path, or the system
            refuses to create it (as `resolve_path`, and naming ``source``).
    """

    def __init__(self, path: object, source: str = "log_json", label: str | None = None) -> None:
        self.path = resolve_path(path, source)
        try:
            self._fd: int | None = os.open(
                self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644
            )
        except OSError as exc:
            raise ValueError(
                f"{source}={self.path!r} cannot be created: {type(exc).__name__}: {exc}"
            ) from None
        self._label = label or f"the JSON log {self.path}"
        self._lock = threading.Lock()
        self._tally = Tally()  # every finding, repeats and followed children included
        self._batch: list[tuple[str, str]] = []  # (kind, line): what a failure loses
        self._written = time.monotonic()
        self._lines: dict[str, int] = {}  # written so far, per kind
        self._failure: str | None = None  # why writing stopped
        self._lost: dict[str, int] = {}

    def __call__(self, finding: Finding, first: bool) -> None:
        """Write ``finding`` if it is new; repeats are only counted, for the summary record."""
        with self._lock:
            self._tally.add(finding)
        if first:
            self.write(finding)

    def write(self, finding: Finding) -> None:
        """Append ``finding`` as one line."""
        self._append(record(finding))

    def write_record(self, obj: dict[str, Any]) -> None:
        """Queue a record that is not a finding (a step's norms), with the rank if any.

        Queued records are written within a second, before the next finding,
        and at `close`.
        """
        line = json.dumps(with_origin(dict(obj)), ensure_ascii=False) + "\n"
        with self._lock:
            if self._fd is None:
                return
            self._batch.append((kind_of(obj), line))
            if (
                len(self._batch) >= _BATCH_LINES
                or time.monotonic() - self._written > _BATCH_SECONDS
            ):
                self._write_batch()

    def write_event(self, obj: dict[str, Any]) -> None:
        """Append a record that is not a finding at once, stamped like one."""
        self._append(stamp(dict(obj)))

    def absorb(
        self,
        findings: Iterable[dict[str, Any]],
        norms: Iterable[dict[str, Any]],
        counts: dict[str, int],
    ) -> None:
        """Append records another process wrote (a followed child), and add its counts.

        The records are written as they are, with that process's ``pid``,
        ``timestamp`` and rank; the summary record at `close` counts them too.
        """
        lines = [
            (kind_of(r), json.dumps(r, ensure_ascii=False) + "\n") for r in (*findings, *norms)
        ]
        with self._lock:
            if self._fd is None:
                return
            self._tally.add_counts(counts)
            self._batch.extend(lines)
            self._write_batch()

    def _append(self, obj: dict[str, Any]) -> None:
        line = json.dumps(obj, ensure_ascii=False) + "\n"
        with self._lock:
            if self._fd is None:
                return
            # after the queued records: the file stays in order
            self._batch.append((kind_of(obj), line))
            self._write_batch()

    def _write_batch(self) -> None:
        """Write the queued lines in one call, or count them lost; the lock is held."""
        batch, self._batch = self._batch, []
        self._written = time.monotonic()
        if not batch:
            return
        if self._failure is None:
            data = "".join(line for _, line in batch).encode("utf-8")
            try:
                assert self._fd is not None
                while data:  # a write to a regular file is whole, but never assume it
                    data = data[os.write(self._fd, data) :]
            except Exception as exc:  # never the job's failure: said once, at close
                self._failure = f"{type(exc).__name__}: {exc}"
        tally = self._lines if self._failure is None else self._lost
        for kind, _ in batch:
            tally[kind] = tally.get(kind, 0) + 1

    def close(self) -> None:
        """Write the summary record if anything was found, then close the file; idempotent.

        A file holding findings but no summary comes from a run that did not
        finish; ``gradguard report`` then counts each distinct finding once.
        What could not be written, or went to a file removed meanwhile, is
        said here, once, on stderr.
        """
        with self._lock:
            counts = self._tally.counts if self._fd is not None else {}
            self._tally = Tally()
        if counts:
            self._append(stamp({"event": "summary", "counts": counts}))
        with self._lock:
            if self._fd is None:
                return
            self._write_batch()
            fd, self._fd = self._fd, None
            try:
                removed = os.fstat(fd).st_nlink == 0
            except OSError:
                removed = False
            try:
                os.close(fd)
            except OSError as exc:  # NFS reports a failed write at close: none is sure
                self._failure = self._failure or f"{type(exc).__name__}: {exc}"
                for kind, n in self._lines.items():
                    self._lost[kind] = self._lost.get(kind, 0) + n
        if self._failure is not None:
            say(
                f"gradguard: could not write {self._label} ({self._failure}); "
                f"lost: {describe(self._lost)}; training was not affected"
            )
        elif removed and self._lines:
            say(
                f"gradguard: {self._label} was removed while gradguard wrote it; "
                f"lost: {describe(self._lines)}; training was not affected"
            )


_KINDS = {  # kind: (one, many), in the order `describe` names them
    "finding": ("1 finding", "{n} findings"),
    "norms": ("1 step's norms", "{n} steps' norms"),
    "summary": ("the summary", "{n} summaries"),
    "other": ("1 other record", "{n} other records"),
}


def kind_of(obj: dict[str, Any]) -> str:
    """What a record is, as `describe` counts it: a finding, norms, the summary or other."""
    if "code" in obj:
        return "finding"
    event = obj.get("event")
    return event if event in ("norms", "summary") else "other"


def describe(counts: dict[str, int]) -> str:
    """``1 finding, 299 steps' norms and the summary``; ``nothing`` for no records."""
    parts = []
    for kind, (one, many) in _KINDS.items():
        n = counts.get(kind, 0)
        if n:
            parts.append(one if n == 1 else many.format(n=n))
    if not parts:
        return "nothing"
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def record(finding: Finding) -> dict[str, Any]:
    """The JSON object written for ``finding``; the schema is documented in the README."""
    out: dict[str, Any] = {
        "code": finding.code,
        "event": finding.name,
        "level": finding.level,
        "step": finding.step,
        "optimizer": finding.optimizer,
        "params": list(finding.params),
        "location": finding.location,
        "hint": finding.hint,
        "doc": finding.doc,
        "message": finding.message,
    }
    if finding.written_at:  # a lifecycle finding's story: the user's other lines
        out["written_at"] = finding.written_at
    if finding.cleared_at:
        out["cleared_at"] = finding.cleared_at
    return stamp(out)


def now() -> str:
    """The current time as the ``timestamp`` field writes it: ISO 8601 in UTC."""
    return (
        datetime.datetime.now(datetime.timezone.utc)
        .isoformat(timespec="microseconds")
        .replace("+00:00", "Z")
    )


def stamp(out: dict[str, Any]) -> dict[str, Any]:
    """Add the ``timestamp``, the ``pid`` and, under ``torch.distributed``, the rank."""
    out["timestamp"] = now()
    return with_origin(out)


def with_origin(out: dict[str, Any]) -> dict[str, Any]:
    """Add the ``pid`` and, when ``torch.distributed`` is initialised, ``rank`` and ``world_size``.

    The pid tells apart the processes of one run (followed children share
    their parent's log), whose optimizers may carry the same label.
    """
    out["pid"] = os.getpid()
    dist = _distributed()
    if dist is not None:
        out["rank"], out["world_size"] = dist
    return out
