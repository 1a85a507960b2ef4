"""The per-code tally behind every summary: counts, first occurrences, a child's merged in."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from gradguard._findings import Finding, make_finding
from gradguard._tally import Tally


def _finding(code: str, step: int, location: str, params: tuple[str, ...] = ("w",)) -> Finding:
    return make_finding(code, step=step, optimizer="SGD#0", params=params, location=location)


def _clock(*seconds: int) -> Callable[[], str]:
    """A clock that gives these seconds of one minute in turn, one per code's first finding."""
    it: Iterator[str] = iter(f"2026-01-01T00:00:{s:02d}.000000Z" for s in seconds)
    return lambda: next(it)


def _rows(tally: Tally) -> list[tuple[str, int, int, str]]:
    return [(r.code, r.count, r.first_step, r.location) for r in tally.rows()]


def test_counts_every_occurrence_and_keeps_each_codes_first() -> None:
    """Repeats are counted; a code's row shows its first finding; rows come sorted by code."""
    tally = Tally()
    tally.add(_finding("GG201", 4, "b.py:2", params=("x", "y")))
    tally.add(_finding("GG101", 2, "a.py:1"))
    tally.add(_finding("GG101", 3, "c.py:7"))
    tally.add(_finding("GG201", 6, "a.py:1"), n=3)
    assert tally.counts == {"GG101": 2, "GG201": 4}
    assert list(tally.counts) == ["GG101", "GG201"]
    assert _rows(tally) == [("GG101", 2, 2, "a.py:1"), ("GG201", 4, 4, "b.py:2")]
    first = tally.rows()[1]
    assert (first.name, first.level, first.params) == ("non-finite-gradient", "error", ("x", "y"))
    assert first.hint.startswith("find the op producing NaN/Inf")
    assert first.doc == "docs/findings/GG201.md"


def test_merge_adds_a_childs_counts_and_keeps_the_earlier_first() -> None:
    """Counts add up; each code's row is whichever process met it first, by its stamp."""
    parent = Tally(clock=_clock(2, 5))
    parent.add(_finding("GG101", 9, "parent.py:1"))
    parent.add(_finding("GG104", 4, "parent.py:3"))
    parent.add(_finding("GG101", 10, "parent.py:1"))
    child = Tally(clock=_clock(1, 6, 7))
    child.add(_finding("GG101", 2, "child.py:7"))
    child.add(_finding("GG104", 8, "child.py:8"), n=2)
    child.add(_finding("GG102", 3, "child.py:9"))
    parent.merge(child)
    assert _rows(parent) == [
        ("GG101", 3, 2, "child.py:7"),  # the child's came a second before the parent's
        ("GG102", 1, 3, "child.py:9"),
        ("GG104", 3, 4, "parent.py:3"),
    ]
    assert _rows(child) == [  # the one merged from is unchanged
        ("GG101", 1, 2, "child.py:7"),
        ("GG102", 1, 3, "child.py:9"),
        ("GG104", 2, 8, "child.py:8"),
    ]


def test_on_a_tie_the_first_merged_wins_and_counts_alone_make_no_row() -> None:
    """Equal stamps keep the row already held; a code known only by its count gets no row."""
    merged, child, parent = Tally(), Tally(clock=_clock(1)), Tally(clock=_clock(1))
    child.add(_finding("GG101", 2, "child.py:7"))
    parent.add(_finding("GG101", 5, "parent.py:1"))
    merged.merge(child)
    merged.merge(parent)
    merged.add_counts({"GG105": 4, "GG101": 1})
    assert _rows(merged) == [("GG101", 3, 2, "child.py:7")]
    assert merged.counts == {"GG101": 3, "GG105": 4}
