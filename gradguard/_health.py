"""Numeric checks computed on the device and read back without stalling it.

A check is a handful of batched ops queued behind the training step; its
boolean result is copied to pinned host memory with a non-blocking copy and
read only once a CUDA event says the copy is complete. On the CPU the result
is ready as soon as it is computed, so reading it costs nothing.
"""

from __future__ import annotations

import torch


class DeviceFlag:
    """Booleans computed on some device, readable later without a sync."""

    __slots__ = ("_event", "_host")

    def __init__(self, flag: torch.Tensor) -> None:
        self._event: torch.cuda.Event | None = None
        if flag.device.type == "cpu":
            self._host = flag
        elif flag.device.type == "cuda":
            self._host = torch.empty(flag.shape, dtype=torch.bool, pin_memory=True)
            self._host.copy_(flag, non_blocking=True)
            self._event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            self._event.record()
        else:  # other backends: no event API we rely on, so read it now
            self._host = flag.to("cpu")

    def ready(self) -> bool:
        """Whether `value` can be read without waiting for the device."""
        return self._event is None or bool(self._event.query())  # type: ignore[no-untyped-call]

    def values(self) -> list[bool]:
        """The flags, flattened; waits for the device only if not `ready` yet."""
        if self._event is not None and not self._event.query():  # type: ignore[no-untyped-call]
            self._event.synchronize()  # sync-ok: only in strict mode or at close
        # tolist() on a host tensor reads memory directly: no op is dispatched.
        return [bool(v) for v in self._host.reshape(-1).tolist()]  # sync-ok: host memory


def zero_flags(grads: list[torch.Tensor], *, each: bool) -> DeviceFlag | None:
    """Queue "exactly zero" for ``grads`` as one batched reduction.

    With ``each`` one flag per tensor, else one flag for all of them together.
    Returns ``None`` when the tensors span several devices, where one result
    would need a cross-device copy per step.
    """
    if not grads or len({g.device for g in grads}) != 1:
        return None
    with torch.no_grad():
        norms = list(torch._foreach_norm(grads))
        if len({n.dtype for n in norms}) != 1:
            norms = [n.float() for n in norms]
        stacked = torch.stack(norms)
        return DeviceFlag(stacked.eq(0) if each else stacked.amax().eq(0))
