"""Numeric checks computed on the device and read back without stalling it.

A check is a handful of batched ops queued behind the training step; its result
is copied to pinned host memory with a non-blocking copy and read only once a
CUDA event says the copy is complete. On the CPU the result is ready as soon as
it is computed, and ``tolist()`` on a host tensor dispatches no op, so reading
it costs nothing either.
"""

from __future__ import annotations

import collections
import contextlib
import math
import statistics
import time
from collections.abc import Iterator

import torch


class Readback:
    """Values computed on some device, readable later without a sync."""

    __slots__ = ("_event", "_host")

    def __init__(self, values: torch.Tensor) -> None:
        self._event: torch.cuda.Event | None = None
        if values.device.type == "cpu":
            self._host = values
        elif values.device.type == "cuda":
            self._host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self._host.copy_(values, non_blocking=True)
            self._event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            self._event.record()
        else:  # other backends: no event API we rely on, so read it now
            self._host = values.to("cpu")

    def ready(self) -> bool:
        """Whether `values` can be read without waiting for the device."""
        return self._event is None or bool(self._event.query())  # type: ignore[no-untyped-call]

    def values(self) -> list[float]:
        """The values, flattened; waits for the device only if not `ready` yet."""
        if self._event is not None and not self._event.query():  # type: ignore[no-untyped-call]
            self._event.synchronize()  # sync-ok: only in strict mode or at close
        # tolist() on a host tensor reads memory directly: no op is dispatched.
        return [float(v) for v in self._host.reshape(-1).tolist()]  # sync-ok: host memory


def _one_device(grads: list[torch.Tensor]) -> bool:
    return bool(grads) and len({g.device for g in grads}) == 1


def _norms(grads: list[torch.Tensor]) -> torch.Tensor:
    """Each tensor's 2-norm as one float32 vector, in one batched op."""
    if all(g.dtype == torch.float32 for g in grads):
        # Asking for a dtype takes a slower per-tensor path on the CPU.
        return torch.stack(torch._foreach_norm(grads))
    # Low precision: accumulate in float32 so a large finite norm stays finite.
    return torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32))


def zero_flags(grads: list[torch.Tensor]) -> Readback | None:
    """Queue "exactly zero" for each of ``grads`` as one batched reduction.

    One value per tensor: 1.0 for zero, 0.0 for finite and nonzero, NaN for
    non-finite. A NaN or Inf says nothing about a clear: clipping spreads one
    gradient's NaN over every other, zeros included. Returns ``None`` when
    the tensors span several devices, where one result would need a
    cross-device copy per step.
    """
    if not _one_device(grads):
        return None
    with torch.no_grad():
        norms = _norms(grads)
        unknown = torch.full_like(norms, math.nan)
        return Readback(torch.where(norms.isfinite(), norms.eq(0).to(norms.dtype), unknown))


def grad_norms(
    grads: list[torch.Tensor], scale: torch.Tensor | None, skipped: torch.Tensor | None
) -> Readback | None:
    """Queue each gradient's 2-norm, divided by ``scale``, then a skipped-step flag.

    ``scale`` is a GradScaler's scale when the gradients are still scaled at
    step time (fused optimizers); ``skipped`` its found-inf tensor, nonzero
    when the scaler is skipping this step.
    """
    if not _one_device(grads):
        return None
    with torch.no_grad():
        norms = _norms(grads)
        if scale is not None:
            norms = norms / scale.to(device=norms.device, dtype=torch.float32)
        flag = (
            skipped.to(device=norms.device, dtype=torch.float32).reshape(1)
            if skipped is not None
            else norms.new_zeros(1)
        )
        return Readback(torch.cat([norms, flag]))


class NormHistory:
    """Running record of total gradient norms, to tell a jump from normal variation."""

    def __init__(
        self, factor: float, max_norm: float | None, warmup: int = 20, size: int = 200
    ) -> None:
        self.factor = factor
        self.max_norm = max_norm
        self.warmup = warmup
        self._norms: collections.deque[float] = collections.deque(maxlen=size)

    def judge(self, total: float) -> str | None:
        """Record ``total``; return why it is exploding, or ``None``.

        A non-finite norm is another finding's business and never enters
        the history, so one NaN step does not poison the median.
        """
        if not math.isfinite(total):
            return None
        verdict = None
        if self.max_norm is not None and total > self.max_norm:
            verdict = f"total norm {total:.3g} > max_grad_norm {self.max_norm:g}"
        elif len(self._norms) >= self.warmup:
            median = statistics.median(self._norms)
            if median > 0 and total >= self.factor * median:
                verdict = f"total norm {total:.3g} is {total / median:.0f}x its median {median:.3g}"
        self._norms.append(total)
        return verdict


def largest_shares(norms: list[float], limit: int = 5) -> list[int]:
    """Indices of the gradients that make up at least half of the squared total norm."""
    order = sorted(range(len(norms)), key=lambda i: -norms[i])
    total = sum(n * n for n in norms)
    picked, acc = [], 0.0
    for i in order[:limit]:
        picked.append(i)
        acc += norms[i] * norms[i]
        if acc >= total / 2:
            break
    return picked


class Cadence:
    """How often the numeric checks run: every ``every`` steps, or within a time budget.

    With ``every=None`` the checks run every step unless queuing them costs
    both more than ``floor`` seconds and more than ``budget`` of the time
    between steps; then every k-th step, the smallest k that keeps them
    inside the budget. On a GPU the ops are queued
    asynchronously and cost microseconds, so this is every step; on a CPU with
    hundreds of small gradient tensors the norm pass itself costs time.
    """

    def __init__(self, every: int | None, budget: float = 0.02, floor: float = 1e-4) -> None:
        self.every = every
        self.budget = budget
        self.floor = floor
        self._count = 0
        self._timed = 0
        self._cost = 0.0  # seconds per check, smoothed
        self._last = 0.0  # time.perf_counter() at the previous due() call
        self._interval = 0.0  # seconds between steps, smoothed

    def due(self) -> bool:
        """Count one step; whether the checks run on it."""
        now = time.perf_counter()
        if self._last:
            gap = now - self._last
            self._interval = gap if not self._interval else 0.9 * self._interval + 0.1 * gap
        self._last = now
        self._count += 1
        return (self._count - 1) % self._period() == 0

    def _period(self) -> int:
        if self.every is not None:
            return self.every
        if not self._interval or self._cost <= self.floor:
            return 1
        return max(1, math.ceil(self._cost / (self.budget * self._interval)))

    @contextlib.contextmanager
    def timed(self) -> Iterator[None]:
        """Measure one check's cost on the host."""
        start = time.perf_counter()
        yield
        cost = time.perf_counter() - start
        self._timed += 1
        if self._timed == 1:
            return  # the first call pays one-off warm-up costs
        self._cost = cost if not self._cost else 0.8 * self._cost + 0.2 * cost
