"""Helpers for asserting on gradguard in your own tests.

Importing this module does not import torch, so a ``conftest.py`` can import it
for every test run; `record` imports torch when it is called.

Both helpers collect every occurrence of a finding, repeats included, and
judge the device results still pending when their block ends.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

from gradguard._config import describe
from gradguard._dispatch import add_sink
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


@contextlib.contextmanager
def capture_findings() -> Iterator[list[Finding]]:
    """Collect every finding any guard in the process reports inside the block, repeats included.

    `record` for all guards at once: those `gradguard.guard` and
    `gradguard.guarding` attach, and those `gradguard.install`, ``gradguard
    run`` and the pytest plugin attach to the optimizers they discover. Each
    occurrence is in the list, in the order reported, as it fired (its step),
    the finding of a strict-mode error included; codes a guard ignores are
    not. When the block ends, every live guard judges the device results
    still pending (`Guard.settle`), so every finding about the block's steps
    is in the list; nothing reported after the block is.

    ::

        with gradguard.testing.capture_findings() as findings:
            train()  # however it guards its optimizers
        assert [f.code for f in findings] == []

    Raises:
        GradGuardError: a strict-mode finding judged when the block ends, as
            `Guard.settle` raises it (it is in the list too).
    """
    seen: list[Finding] = []

    def collect(finding: Finding, first: bool) -> None:
        seen.append(finding)

    with add_sink(collect):
        try:
            yield seen
        finally:
            _settle_live_guards()


def _settle_live_guards() -> None:
    """`Guard.settle` every live guard; none can exist before gradguard's guard module ran."""
    if "gradguard._guard" in sys.modules:
        from gradguard._api import settle_all

        settle_all()
