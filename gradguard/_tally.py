"""Counting findings per code: how often each fired, its first occurrence, the summary rows.

A guard's summary, a session's (its followed children's counted in), the
JSON log's summary record and ``gradguard report`` all count with a `Tally`,
so they agree on what a count and a first occurrence are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

from gradguard._findings import CATALOGUE, Finding, story


@dataclasses.dataclass(frozen=True)
class SummaryRow:
    """Counts for one finding code over a guard's lifetime."""

    code: str
    name: str
    level: str
    count: int
    first_step: int
    location: str
    params: tuple[str, ...]
    hint: str
    story: str = ""  # the user's lines a lifecycle finding involves (`_findings.story`)

    @property
    def doc(self) -> str:
        """The page explaining this code, such as ``docs/findings/GG102.md``."""
        entry = CATALOGUE.get(self.code)
        return entry.doc if entry is not None else ""


class Tally:
    """Per finding code: how many times it fired, and where and how it first did.

    ``clock`` stamps each code's first occurrence (an ISO 8601 UTC text, which
    sorts in time order), so that a merge keeps the earliest of several
    processes'. Without one the first occurrences are unstamped, and a merge
    keeps its own. The owner holds any lock: a tally takes none.
    """

    def __init__(self, clock: Callable[[], str] | None = None) -> None:
        self._clock = clock
        self._counts: dict[str, int] = {}
        # code: (when, row); the row's count is filled in by `rows`
        self._first: dict[str, tuple[str, SummaryRow]] = {}

    def add(self, finding: Finding, n: int = 1) -> None:
        """Count ``n`` occurrences of ``finding``; the first of its code is kept."""
        code = finding.code
        self._counts[code] = self._counts.get(code, 0) + n
        if code not in self._first:
            at = "" if self._clock is None else self._clock()
            self._first[code] = (at, _row(finding))

    def add_counts(self, counts: Mapping[str, int]) -> None:
        """Add counts made elsewhere, such as a followed child's summary record."""
        for code, n in counts.items():
            self._counts[code] = self._counts.get(code, 0) + n

    def first_seen(self, row: SummaryRow, at: str) -> None:
        """Keep ``row`` as its code's first occurrence if it came before the one kept.

        ``at`` is when it happened, as `clock` gives it; on a tie the row kept
        stays. ``row.count`` is not read: `rows` gives each code its count.
        """
        kept = self._first.get(row.code)
        if kept is None or at < kept[0]:
            self._first[row.code] = (at, row)

    def merge(self, other: Tally) -> None:
        """Add ``other``'s counts; for each code keep the earlier first occurrence."""
        self.add_counts(other._counts)
        for at, row in other._first.values():
            self.first_seen(row, at)

    @property
    def counts(self) -> dict[str, int]:
        """How often each code fired, sorted by code; a copy."""
        return dict(sorted(self._counts.items()))

    def rows(self) -> list[SummaryRow]:
        """One row per code whose first occurrence is known, sorted by code.

        A code only counted (a child's summary record without its findings)
        has no row: nothing says where it happened.
        """
        return [
            dataclasses.replace(self._first[code][1], count=self._counts.get(code, 0))
            for code in sorted(self._first)
        ]


def _row(finding: Finding) -> SummaryRow:
    """``finding`` as its code's first occurrence; `Tally.rows` fills in the count."""
    return SummaryRow(
        code=finding.code,
        name=finding.name,
        level=finding.level,
        count=0,
        first_step=finding.step,
        location=finding.location,
        params=finding.params,
        hint=finding.hint,
        story=story(finding.code, finding.written_at, finding.cleared_at, finding.location),
    )
