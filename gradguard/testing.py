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
    Device results still pending when the block ends are judged then, so
    every finding about the block's steps is in the list.
    """
    seen: list[Finding] = []
    guard._reporter.listeners.append(seen.append)
    try:
        yield seen
    finally:
        try:
            guard.settle()  # results still on the device are about the block's steps
        finally:
            guard._reporter.listeners.remove(seen.append)
