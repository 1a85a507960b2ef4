"""Helpers for asserting on gradguard in your own tests."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from gradguard._findings import Finding
from gradguard._guard import Guard


@contextlib.contextmanager
def record(guard: Guard) -> Iterator[list[Finding]]:
    """Collect every finding ``guard`` reports inside the block, repeats included.

    ``guard.findings`` keeps one finding per code and place; this list keeps
    each occurrence, in order, for tests that check what every step reported.
    """
    seen: list[Finding] = []
    guard._reporter.listeners.append(seen.append)
    try:
        yield seen
    finally:
        guard._reporter.listeners.remove(seen.append)
