"""Reports a person reads: the summary table, and what ``gradguard report`` reads it from.

The table is the same at the runner's exit and in ``gradguard report``: one
row per code with its count, first step, first location and parameters, and
the fix with the page that explains the code right under it. It is plain text
that reads well in a file; colour is added only for a terminal.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import textwrap
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TextIO

from gradguard._config import short_repr
from gradguard._findings import CATALOGUE, story
from gradguard._tally import SummaryRow, Tally

Record = dict[str, Any]

# A row must fit a terminal of 100 columns or so: long cells are cut, not wrapped.
_PARAMS_SHOWN = 3
_CELL_WIDTH = 40
_DEFAULT_WIDTH = 100
_HEADERS = ("code", "name", "count", "first step", "first location", "parameters")
_RIGHT = frozenset({"count", "first step"})
_LEVEL_COLOURS = {"error": "31;1", "warning": "33;1", "info": "36"}


class ReportError(ValueError):
    """A report cannot be made from what was given; the message says why."""


# -- rendering -----------------------------------------------------------------


def wants_colour(stream: TextIO) -> bool:
    """Colour only for a terminal, and never when ``NO_COLOR`` is set (no-color.org)."""
    if os.environ.get("NO_COLOR"):
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):  # replaced or closed streams
        return False


def width_for(stream: TextIO) -> int:
    """The terminal's width for a terminal, else a fixed width so files read the same."""
    if wants_colour(stream):
        return max(60, shutil.get_terminal_size((_DEFAULT_WIDTH, 24)).columns)
    return _DEFAULT_WIDTH


def render_table(
    rows: Sequence[SummaryRow], *, colour: bool = False, width: int = _DEFAULT_WIDTH
) -> str:
    """The summary table: a header, then per code its row and its fix wrapped below it."""
    cells = [
        (
            r.code,
            r.name,
            str(r.count),
            str(r.first_step),
            _cut_left(r.location or "-", _CELL_WIDTH),
            _params(r.params),
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(_HEADERS)]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if h in _RIGHT else v.ljust(w)
            for h, v, w in zip(_HEADERS, values, widths, strict=True)
        ]
        return "  ".join(parts).rstrip()

    indent = " " * (widths[0] + 2)
    out = [_paint(line(_HEADERS), "1", colour)]
    for row, values in zip(rows, cells, strict=True):
        text = line(values)
        code = _paint(row.code, _LEVEL_COLOURS.get(row.level, "0"), colour)
        out.append(code + text[len(row.code) :])
        if row.story:  # the user's lines involved, first occurrence
            out.extend(
                textwrap.wrap(
                    f"lines: {row.story}",
                    width=max(40, width),
                    initial_indent=indent,
                    subsequent_indent=indent + "       ",
                    break_on_hyphens=False,
                )
            )
        doc = f" See {row.doc}." if row.doc else ""
        fix = textwrap.wrap(
            f"fix: {row.hint}.{doc}",
            width=max(40, width),
            initial_indent=indent,
            subsequent_indent=indent + "     ",
            break_on_hyphens=False,
        )
        out.extend(_paint(f, "2", colour) for f in fix)
    return "\n".join(out)


def _params(params: Sequence[str]) -> str:
    if not params:
        return "-"
    shown = ", ".join(params[:_PARAMS_SHOWN])
    if len(params) > _PARAMS_SHOWN:
        shown += f", +{len(params) - _PARAMS_SHOWN} more"
    return shown if len(shown) <= _CELL_WIDTH else shown[: _CELL_WIDTH - 3] + "..."


def _cut_left(text: str, limit: int) -> str:
    """Keep the end of a long path: the file and line are what a reader needs."""
    return text if len(text) <= limit else "..." + text[-(limit - 3) :]


def _paint(text: str, sgr: str, colour: bool) -> str:
    return f"\x1b[{sgr}m{text}\x1b[0m" if colour else text


def plural(n: int, noun: str) -> str:
    """``1 finding``, ``2 findings``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


# -- reading JSON logs -----------------------------------------------------------


@dataclasses.dataclass
class Run:
    """What one or more JSON-lines logs hold, merged across files (one per rank)."""

    paths: list[str]
    findings: list[Record] = dataclasses.field(default_factory=list)
    norms: list[Record] = dataclasses.field(default_factory=list)
    # Per code: the count over every file, and the earliest finding in any.
    tally: Tally = dataclasses.field(default_factory=Tally)
    ranks: set[int] = dataclasses.field(default_factory=set)
    notes: list[str] = dataclasses.field(default_factory=list)
    # From a followed child's own file only, never in a user's log: one
    # "watching" record per optimizer the child stepped.
    watched: int = 0
    stepping: set[int] = dataclasses.field(default_factory=set)

    def summary(self) -> list[SummaryRow]:
        """Per code: the count over every file, and the first occurrence anywhere."""
        return self.tally.rows()


def expand(patterns: Iterable[str]) -> list[str]:
    """The files named by ``patterns``; a quoted glob such as ``'run-*.jsonl'`` is expanded.

    Raises:
        ReportError: a path does not exist or a pattern matches nothing.
    """
    out: list[str] = []
    for pattern in patterns:
        if os.path.isfile(pattern):
            matches = [pattern]
        elif os.path.isdir(pattern):
            raise ReportError(
                f"{pattern!r} is a directory; give the JSON-lines files in it, "
                f"such as {os.path.join(pattern, '*.jsonl')!r}"
            )
        elif any(ch in pattern for ch in "*?["):
            matches = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
            if not matches:
                raise ReportError(f"no file matches {pattern!r}")
        else:
            raise ReportError(f"no such file: {pattern!r}")
        out.extend(m for m in matches if m not in out)
    return out


def load(paths: Sequence[str]) -> Run:
    """Read and merge the JSON-lines logs at ``paths``.

    Each file's count of a code comes from its summary record; a file
    without one (a run that did not finish) counts each distinct finding
    once, and the report says so.
    """
    run = Run(paths=list(paths))
    for path in paths:
        findings: list[Record] = []
        counts: dict[str, int] = {}
        summaries = bad = 0
        first_bad = ""
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.readlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ReportError(f"cannot read {path}: {exc}") from None
        for number, text in enumerate(lines, 1):
            if not text.strip():
                continue
            try:
                rec = json.loads(text)
            except json.JSONDecodeError:
                rec = None
            problem = _problem(rec)
            if problem is not None or not isinstance(rec, dict):
                bad += 1
                first_bad = first_bad or f"line {number}: {problem}"
                continue
            if isinstance(rec.get("rank"), int):
                run.ranks.add(rec["rank"])
            event = rec.get("event")
            if event == "summary" and isinstance(rec.get("counts"), dict):
                summaries += 1
                for code, n in rec["counts"].items():
                    counts[str(code)] = counts.get(str(code), 0) + _int(n)
            elif event == "norms":
                run.norms.append(rec)
            elif event == "watching":
                run.watched += 1
                run.stepping.add(_int(rec.get("pid")))
            else:
                findings.append(rec)
        distinct: dict[str, int] = {}
        for rec in findings:
            distinct[rec["code"]] = distinct.get(rec["code"], 0) + 1
            # Timestamps are ISO 8601 in UTC, so their text order is their time order.
            run.tally.first_seen(_first_row(rec), str(rec.get("timestamp", "")))
        # Several processes may share one file; one that died wrote no summary.
        run.tally.add_counts({code: max(n, counts.get(code, 0)) for code, n in distinct.items()})
        run.findings.extend(findings)
        if findings and not summaries:
            run.notes.append(
                f"{path} has no summary record (the run did not finish, or is still "
                "running): its counts are of distinct findings only"
            )
        if bad:
            what = "line that is not a gradguard record" if bad == 1 else "lines that are not"
            which = "" if bad == 1 else "the first at "
            run.notes.append(
                f"{path}: skipped {bad} {what}{' gradguard records' * (bad > 1)} "
                f"({which}{first_bad})"
            )
    return run


# What each record gradguard writes may hold: a check and what it allows, per field.
# A field may be absent (a log written by hand, an older version); never of another type.
_Check = tuple[Callable[[object], bool], str]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_norm(value: object) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _is_counts(value: object) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and _is_int(n) and n >= 0 for k, n in value.items()
    )


def _is_modules(value: object) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and _is_norm(n) for k, n in value.items()
    )


def _is_strings(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(p, str) for p in value)


_STR: _Check = (lambda v: isinstance(v, str), "a string")
_INT: _Check = (_is_int, "an integer")
_ORIGIN = {"timestamp": _STR, "pid": _INT, "rank": _INT, "world_size": _INT}
_FIELDS: dict[object, dict[str, _Check]] = {
    "summary": {"counts": (_is_counts, "an object of code: count")},
    "norms": {
        "step": _INT,
        "optimizer": _STR,
        "total": (_is_norm, "a number or null"),
        "produced": (_is_norm, "a number or null"),
        "modules": (_is_modules, "an object of module name: number or null"),
    },
    "watching": {},
    None: {  # a finding
        "code": _STR,
        "event": _STR,
        "level": _STR,
        "step": _INT,
        "optimizer": _STR,
        "params": (_is_strings, "a list of strings"),
        "location": _STR,
        "hint": _STR,
        "doc": _STR,
        "message": _STR,
        "written_at": _STR,
        "cleared_at": _STR,
    },
}


def _problem(rec: object) -> str | None:
    """Why ``rec`` is not a record gradguard writes, or ``None`` if it is one."""
    if not isinstance(rec, dict):
        return "not a JSON object" if rec is not None else "not JSON"
    event = rec.get("event")
    if event in _FIELDS:
        fields, required = _FIELDS[event], "counts" if event == "summary" else None
    elif "code" in rec:
        fields, required = _FIELDS[None], "code"
    else:
        return 'neither a finding (no "code") nor a summary, norms or watching record'
    if required is not None and required not in rec:
        return f'no "{required}" field'
    for name, (check, allowed) in {**_ORIGIN, **fields}.items():
        if name in rec and not check(rec[name]):
            return f'"{name}" must be {allowed}; got {short_repr(rec[name])}'
    return None


def _first_row(rec: Record) -> SummaryRow:
    """A finding record as its code's first occurrence; the catalogue fills in what it lacks."""
    code = str(rec["code"])
    entry = CATALOGUE.get(code)
    return SummaryRow(
        code=code,
        name=str(rec.get("event") or (entry.name if entry else "")),
        level=str(rec.get("level") or (entry.level if entry else "")),
        count=0,  # `Tally.rows` gives the count
        first_step=_int(rec.get("step")),
        location=str(rec.get("location") or ""),
        params=tuple(str(p) for p in rec.get("params") or ()),
        hint=str(rec.get("hint") or (entry.hint if entry else "")),
        story=story(
            code,
            str(rec.get("written_at") or ""),
            str(rec.get("cleared_at") or ""),
            str(rec.get("location") or ""),
        ),
    )


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def report_text(
    run: Run, *, colour: bool = False, width: int = _DEFAULT_WIDTH, plotting: bool = False
) -> str:
    """The text ``gradguard report`` prints: a title, the table, and notes."""
    rows = run.summary()
    where = run.paths[0] if len(run.paths) == 1 else f"{len(run.paths)} files"
    if len(run.ranks) > 1:
        where += f" (ranks {', '.join(str(r) for r in sorted(run.ranks))})"
    total = sum(r.count for r in rows)
    lines = [f"gradguard: {plural(total, 'finding') if rows else 'no findings'} in {where}"]
    if rows:
        lines += ["", render_table(rows, colour=colour, width=width)]
    if run.norms:
        steps = len({(r.get("optimizer"), r.get("step")) for r in run.norms})
        hint = "" if plotting else "; draw them with --plot timeline.png"
        lines += ["", f"gradient norms recorded for {plural(steps, 'step')}{hint}"]
    lines += [f"note: {note}" for note in run.notes]
    return "\n".join(lines)
