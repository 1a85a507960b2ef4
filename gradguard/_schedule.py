"""When a device result is judged: at once when readable, else in order at a later step.

On the CPU a result is ready as soon as it exists. On CUDA it is copied to
pinned memory without blocking (`Readback`) and judged at a later step, once
its event has completed. Results are judged first in, first out: one judged
later never overtakes one computed before it. Waiting (strict mode, settling,
closing) waits once, for the newest result.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

from gradguard._health import Readback
from gradguard._ranks import Exchange

Resolver = Callable[[list[float], list["torch.Tensor | None"]], None]
"""Judges a result: its values, and the parameters it is about (``None`` once collected)."""


class Now:
    """A result with no values, ready at once: queued, it is judged after those before it."""

    def ready(self) -> bool:
        return True

    def values(self) -> list[float]:
        return []


AFTER_PENDING = Now()

Result = Readback | Exchange | Now


class _Pending:
    """A device-side result not read back yet, the parameters it is about, and its use."""

    __slots__ = ("params", "readback", "resolve")

    def __init__(
        self, readback: Result, params: list[weakref.ref[torch.Tensor]], resolve: Resolver
    ) -> None:
        self.readback = readback
        # Parameters, not gradients: naming them later must not keep grads alive.
        self.params = params
        self.resolve = resolve


class Schedule:
    """One guard's device results still to judge, in the order they were computed.

    ``on_queue`` runs each time a result is left for later, while the step
    that computed it still runs (the guard fixes what it needs from that
    moment: where the step is, the parameters' names).
    """

    def __init__(self, on_queue: Callable[[], None]) -> None:
        self.queue: list[_Pending] = []
        self._on_queue = on_queue

    def defer(self, readback: Result, params: list[torch.Tensor], resolve: Resolver) -> bool:
        """Judge now when readable and nothing is queued before it, else later.

        Returns whether it was judged now.
        """
        if not self.queue and readback.ready():
            resolve(readback.values(), list(params))  # no weak references needed
            return True
        self._on_queue()
        self.queue.append(_Pending(readback, list(map(weakref.ref, params)), resolve))
        return False

    def drain(self, wait: bool) -> None:
        """Judge the queued results that have arrived (all of them with ``wait``), in order.

        Waiting, it waits once, for the newest device result: those computed
        before it on the stream are complete then too.
        """
        if wait:
            newest = [p.readback for p in self.queue if isinstance(p.readback, Readback)]
            if newest:
                newest[-1].wait()
        while self.queue:
            pending = self.queue[0]
            if not (wait or pending.readback.ready()):
                return
            del self.queue[0]
            self.resolve(pending.readback, [r() for r in pending.params], pending.resolve)

    def resolve(
        self, readback: Result, alive: list[torch.Tensor | None], resolve: Resolver
    ) -> None:
        """Read a result back and judge it: in a step's hook, or when settling or closing.

        ``alive``: the parameters it is about, ``None`` for those collected since.
        """
        resolve(readback.values(), alive)

    def clear(self) -> None:
        """Forget what is queued (the guard failed, or there is nothing left to report to)."""
        self.queue.clear()
