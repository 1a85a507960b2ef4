"""Helpers for asserting on gradguard in your own tests.

Importing this module does not import torch, so a ``conftest.py`` can import it
for every test run; `record` imports torch when it is called.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from gradguard._config import describe
from gradguard._findings import Finding

if TYPE_CHECKING:
    from gradguard._guard import Guard


def record(guard: Guard) -> contextlib.AbstractContextManager[list[Finding]]:
    """Collect every finding ``guard`` reports inside the block, repeats included.

    ``guard.findings`` keeps one finding per code and place; this list keeps
    each occurrence, in order, for tests that check what every step reported.
    Device results still pending when the block ends are judged then, so
    every finding about the block's steps is in the list.

    Raises:
        TypeError: ``guard`` is not a `Guard` (an optimizer, say), at the call.
    """
    import torch

    from gradguard._guard import Guard

    if isinstance(guard, torch.optim.Optimizer):
        raise TypeError(
            f"record() needs a gradguard.Guard, not the optimizer ({type(guard).__name__}); "
            "use record(gradguard.guard_of(opt))"
        )
    if not isinstance(guard, Guard):
        raise TypeError(
            "record() needs a gradguard.Guard, as gradguard.guarding(opt) yields or "
            f"gradguard.guard_of(opt) returns; got {describe(guard)}"
        )
    return _record(guard)


@contextlib.contextmanager
def _record(guard: Guard) -> Iterator[list[Finding]]:
    seen: list[Finding] = []
    guard._reporter.listeners.append(seen.append)
    try:
        yield seen
    finally:
        try:
            guard.settle()  # results still on the device are about the block's steps
        finally:
            guard._reporter.listeners.remove(seen.append)
