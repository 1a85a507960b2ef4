"""Per-parameter gradient lifecycle: written by backward, applied by a step, cleared.

One `Slot` per parameter, shared by every guard that watches the parameter, so a
clear seen through one optimizer counts for all of them. Slots never hold a
gradient (that would stop AccumulateGrad from stealing the incoming buffer):
only a weak reference and the tensor's version counter.

The post-accumulate hook is the hot path: per parameter and per backward it
compares one weak reference and one version number and bumps a counter.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

ErrorHandler = Callable[[BaseException], None]


class Slot:
    """What gradguard knows about one parameter's ``.grad``.

    Attributes:
        ref: weak reference to the gradient object last seen, or ``None``.
        version: that object's ``_version`` when last seen.
        fresh: backward accumulations since the last step or clear.
        stale: the gradient holds a contribution a step already applied.
        applied: the last thing that happened was a step applying ``ref``.
        discarded: accumulations that a clear threw away before any step.
    """

    __slots__ = (
        "__weakref__",
        "applied",
        "discarded",
        "finalizer",
        "fresh",
        "handle",
        "on_error",
        "param_ref",
        "ref",
        "stale",
        "users",
        "version",
    )

    def __init__(self, param: torch.Tensor, on_error: ErrorHandler) -> None:
        self.param_ref = weakref.ref(param)
        self.on_error = on_error
        self.handle: RemovableHandle | None = None
        self.finalizer: weakref.finalize[Any, Any] | None = None
        self.users = 0
        self.stale = False
        self.applied = False
        self.discarded = 0
        grad = param.grad
        # A gradient that exists before we watch came from a backward we did
        # not see; count it as fresh so the first step is not misjudged.
        self.ref: weakref.ref[torch.Tensor] | None = None
        self.version = -1
        self.fresh = 0
        if grad is not None:
            self.ref = weakref.ref(grad)
            self.version = grad._version
            self.fresh = 1

    def hook(self, param: torch.Tensor) -> None:
        """Register the post-accumulate hook if the parameter can take one now."""
        if self.handle is None and param.requires_grad:
            self.handle = param.register_post_accumulate_grad_hook(  # type: ignore[no-untyped-call]
                self.on_accumulate
            )

    def unhook(self) -> None:
        """Remove the hook; idempotent."""
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def on_accumulate(self, param: torch.Tensor) -> None:
        """Post-accumulate hook: backward just wrote into ``param.grad``."""
        try:
            grad = param.grad
            ref = self.ref
            if (
                ref is not None
                and grad is not None
                and ref() is grad
                and grad._version == self.version + 1
            ):
                # Accumulated onto the gradient we saw last: a step that
                # applied it without a clear in between makes it stale.
                self.stale = self.stale or self.applied
                self.fresh += 1
            else:
                # A new object, or one changed in place since we saw it
                # (cleared, rescaled): its history ends here.
                self.ref = None if grad is None else weakref.ref(grad)
                self.stale = False
                self.fresh = 1
            self.version = -1 if grad is None else grad._version
            self.applied = False
            self.discarded = 0
        except Exception as exc:  # never break a user's backward
            self.on_error(exc)

    def on_clear(self, param: torch.Tensor, inside_step: bool) -> None:
        """An observed ``zero_grad`` just cleared ``param.grad``."""
        if not inside_step and self.fresh:
            self.discarded = self.fresh
        if inside_step:
            self.discarded = 0
        self.fresh = 0
        self.stale = False
        self.applied = False
        self.see(param.grad)

    def on_applied(self, param: torch.Tensor) -> None:
        """A step just consumed ``param.grad``."""
        grad = param.grad
        fresh = self.fresh
        self.fresh = 0
        self.stale = False
        self.discarded = 0
        if grad is None:
            self.applied = False
            self.ref = None
            self.version = -1
            return
        # `see` inlined: this runs per parameter at every step.
        ref = self.ref
        held = ref is not None and ref() is grad
        # Only backward output (fresh, re-applied, or assigned by hand where we
        # could not see it made) counts; zeros left by a clear are no content.
        self.applied = fresh > 0 or self.applied or not held
        if not held:
            self.ref = weakref.ref(grad)
        self.version = grad._version

    def see(self, grad: torch.Tensor | None) -> None:
        """Remember ``grad`` as the object currently in ``.grad``."""
        if grad is None:
            self.ref = None
            self.version = -1
            return
        if self.ref is None or self.ref() is not grad:
            self.ref = weakref.ref(grad)
        self.version = grad._version

    def holds(self, grad: torch.Tensor) -> bool:
        """Whether ``grad`` is exactly the object and version last seen."""
        return self.ref is not None and self.ref() is grad and grad._version == self.version


class Registry:
    """The process's slots, one per watched parameter, with reference counts."""

    def __init__(self) -> None:
        self._slots: dict[int, Slot] = {}
        self._lock = threading.Lock()

    def acquire(self, param: torch.Tensor, on_error: ErrorHandler) -> Slot:
        """Return the parameter's slot, creating and hooking it on first use."""
        with self._lock:
            key = id(param)
            slot = self._slots.get(key)
            if slot is None or slot.param_ref() is not param:
                slot = Slot(param, on_error)
                self._slots[key] = slot
                slot.finalizer = weakref.finalize(param, self._forget, key, weakref.ref(slot))
            slot.users += 1
        slot.hook(param)
        return slot

    def release(self, slot: Slot) -> None:
        """Drop one user of ``slot``; the last one removes its hook."""
        with self._lock:
            slot.users -= 1
            if slot.users > 0:
                return
            slot.unhook()
            if slot.finalizer is not None:
                slot.finalizer.detach()
            param = slot.param_ref()
            if param is not None and self._slots.get(id(param)) is slot:
                del self._slots[id(param)]

    def _forget(self, key: int, slot_ref: weakref.ref[Slot]) -> None:
        with self._lock:
            if self._slots.get(key) is slot_ref():
                del self._slots[key]

    def __len__(self) -> int:
        return len(self._slots)


REGISTRY = Registry()
