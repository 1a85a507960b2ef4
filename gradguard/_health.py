"""Numeric checks computed on the device and read back without stalling it.

A check is a handful of batched ops queued behind the training step; its result
is copied to pinned host memory with a non-blocking copy and read only once a
CUDA event says the copy is complete. On the CPU the result is ready as soon as
it is computed, and ``tolist()`` on a host tensor dispatches no op, so reading
it costs nothing either.
"""

from __future__ import annotations

import math
import operator
import weakref
from collections.abc import Callable
from itertools import repeat
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from gradguard._process import keep, keep_with
from gradguard._sharded import local


class Lateness:
    """How late device results arrive: a switch for tests, not an option.

    On the CPU a result is ready as soon as it is computed, so the paths that
    judge a result steps later (a CUDA device running behind the host) never
    run there. Tests set ``steps`` (a result is ready once that many more steps
    of any guard have begun) or ``until_close`` (only when its guard closes)
    to run them. `Readback.values` still returns at once when asked, as a
    CUDA event's ``synchronize`` does (strict mode, closing).
    """

    steps = 0
    until_close = False
    clock = 0  # steps begun, while ``steps`` is set

    def reset(self) -> None:
        """Back to results ready when computed."""
        self.steps, self.until_close = 0, False

    def step_began(self) -> None:
        if self.steps:
            self.clock += 1

    def due(self) -> int:
        """The clock at which a result computed now is ready."""
        return self.clock + self.steps if self.steps else 0

    def holds(self, due: int) -> bool:
        """Whether a result due at ``due`` is still on its way."""
        return self.until_close or self.clock < due


LATENESS = Lateness()
keep_with("lateness", LATENESS, LATENESS.reset)


class _Waits:
    """How many times gradguard waited for the device (`Readback.wait`): tests count it."""

    count = 0

    def clear(self) -> None:
        self.count = 0


WAITS = keep("waits", _Waits(), cache=True)


class Readback:
    """Values computed on some device, readable later without a sync.

    ``order``, when given, says which input each computed value belongs to:
    value ``k`` is about input ``order[k]``. `values` returns them in input
    order, so a result computed in several batches (one per dtype) needs no
    device-side permutation. ``tail``: values known on the host already,
    returned after the computed ones (a constant flag costs no device op).
    """

    __slots__ = ("_due", "_event", "_host", "_order", "_tail")

    def __init__(
        self,
        values: torch.Tensor,
        order: list[int] | None = None,
        tail: tuple[float, ...] = (),
    ) -> None:
        self._event: torch.cuda.Event | None = None
        self._order = order
        self._tail = tail
        self._due = LATENESS.due() if LATENESS.steps else 0
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
        if (LATENESS.steps or LATENESS.until_close) and LATENESS.holds(self._due):  # tests
            return False
        return self._event is None or bool(self._event.query())  # type: ignore[no-untyped-call]

    def wait(self) -> None:
        """Wait for the device to have computed and copied the values (one sync on CUDA)."""
        WAITS.count += 1
        if self._event is not None:
            self._event.synchronize()  # sync-ok: only in strict mode or when settling

    def values(self) -> list[float]:
        """The values, flattened, in input order; waits for the device only if not `ready` yet."""
        if self._event is not None and not self._event.query():  # type: ignore[no-untyped-call]
            self._event.synchronize()  # sync-ok: only in strict mode or at close
        # tolist() on a host tensor reads memory directly: no op is dispatched
        # (a reshape would be one: results are vectors already, but for a scalar).
        host = self._host if self._host.dim() == 1 else self._host.reshape(-1)
        flat: list[float] = host.tolist()  # sync-ok: host memory
        if not host.dtype.is_floating_point:  # Python ints or bools: floats, as promised
            flat = [float(v) for v in flat]
        flat += self._tail
        order = self._order
        if order is None:
            return flat
        out = flat[:]  # values past the ordered ones (a trailing flag) stay where they are
        for k, i in enumerate(order):
            out[i] = flat[k]
        return out


_GRAD = operator.attrgetter("grad")
_DTYPE = operator.attrgetter("dtype")
_DEVICE = operator.attrgetter("device")
_LAYOUT = operator.attrgetter("layout")

# dtypes whose norm kernel accumulates in their own precision; the norm of a
# complex tensor is real (float32 or float64).
_OWN_PRECISION = frozenset({torch.float32, torch.float64, torch.complex64, torch.complex128})
_HALF = frozenset({torch.float16, torch.bfloat16})


def _one_device(grads: list[torch.Tensor]) -> bool:
    """One device holding data: a meta tensor has no values to check."""
    if not grads:
        return False
    devices = set(map(_DEVICE, grads))
    return len(devices) == 1 and next(iter(devices)).type != "meta"


def _plain(grads: list[torch.Tensor]) -> bool:
    """Dense tensors of one dtype whose norm kernel keeps their precision, on one device
    with data (at C speed)."""
    dtypes = set(map(_DTYPE, grads))
    devices = set(map(_DEVICE, grads))
    return (
        len(dtypes) == 1
        and len(devices) == 1
        and next(iter(devices)).type != "meta"
        and dtypes <= _OWN_PRECISION
        and all(map(operator.is_, map(type, grads), repeat(torch.Tensor)))
        and all(map(operator.is_, map(_LAYOUT, grads), repeat(torch.strided)))
    )


def _norms_of(grads: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """The 2-norms of ``grads``, all of ``dtype``, in one batched op."""
    if dtype in _OWN_PRECISION:
        # Asking for a dtype takes a slower per-tensor path on the CPU.
        return list(torch._foreach_norm(grads))
    if dtype in _HALF:
        # Low precision: accumulate in float32 so a large finite norm stays finite.
        return list(torch._foreach_norm(grads, 2, dtype=torch.float32))
    # float8 and other dtypes without a norm kernel: norm a widened copy.
    return list(torch._foreach_norm([g.float() for g in grads]))


def _values(grad: torch.Tensor) -> torch.Tensor:
    """The stored values of a sparse gradient (``nn.Embedding(sparse=True)``), else itself.

    An uncoalesced sparse gradient may store one index several times: the norm
    of its values bounds the true norm from above, and is non-finite exactly
    when the gradient is.
    """
    if grad.layout is torch.strided:
        return grad
    if grad.layout is torch.sparse_coo:
        return grad._values()
    return grad.values()  # compressed layouts (CSR, CSC, BSR, BSC)


def _norms(grads: list[torch.Tensor]) -> tuple[torch.Tensor, list[int] | None]:
    """Each tensor's 2-norm as one real vector, and the input order of its values.

    One batched op per dtype. The vector is float64 when any norm is (float64
    and complex128 gradients, whose norms can exceed float32's range), else
    float32. The order is ``None`` when the values are in input order (a
    single dtype, the usual case). A DTensor (FSDP2) is normed on this rank's
    shard: no collective, and a host-readable result. Sparse gradients count
    by their values: norm kernels refuse sparse tensors, so only then are they
    looked for.
    """
    if set(map(type, grads)) != {torch.Tensor}:
        grads = [local(g) for g in grads]
    try:
        return _dense_norms(grads)
    except (NotImplementedError, RuntimeError):
        if all(g.layout is torch.strided for g in grads):
            raise
        return _dense_norms([_values(g) for g in grads])


def _dense_norms(grads: list[torch.Tensor]) -> tuple[torch.Tensor, list[int] | None]:
    dtypes = set(map(_DTYPE, grads))
    if len(dtypes) == 1:
        return torch.stack(_norms_of(grads, dtypes.pop())), None
    order: list[int] = []
    parts: list[torch.Tensor] = []
    for dtype in sorted(dtypes, key=str):
        index = [i for i, g in enumerate(grads) if g.dtype == dtype]
        order.extend(index)
        parts.append(torch.stack(_norms_of([grads[i] for i in index], dtype)))
    wide = torch.float64 if any(p.dtype == torch.float64 for p in parts) else torch.float32
    return torch.cat([p.to(wide) for p in parts]), order


def zero_flags(grads: list[torch.Tensor], extra: torch.Tensor | None = None) -> Readback | None:
    """Queue "exactly zero" for each of ``grads`` as one batched reduction.

    One value per tensor: 1.0 for zero, 0.0 for finite and nonzero, NaN for
    non-finite. A NaN or Inf says nothing about a clear: clipping spreads one
    gradient's NaN over every other, zeros included. ``extra``, a one-element
    tensor on the same device, is read back with them as a last value.
    Returns ``None`` when the tensors span several devices, where one result
    would need a cross-device copy per step.
    """
    if not _one_device(grads) or (extra is not None and extra.device != grads[0].device):
        return None
    with torch.no_grad():
        norms, order = _norms(grads)
        # norms * 0 is 0 where finite and NaN where not; adding "is zero" makes
        # the flag: three ops, where isfinite and where take five.
        flags = norms.mul(0).add_(norms.eq(0))
        if extra is not None:
            flags = torch.cat([flags, extra.to(flags.dtype).reshape(1)])
        return Readback(flags, order)


class FiniteProbe:
    """Whether one parameter's gradient was finite when the last backward wrote it.

    Armed on a parameter whose fresh gradient was found zeroed in place by
    something no wrapper sees: a clear, or a sanitising ``nan_to_num_`` of a
    backward that wrote NaN. The next time it happens, the probe tells the
    two apart. One small reduction per backward, queued on the device, only
    while armed; it holds no gradient.
    """

    def __init__(self, on_error: Callable[[BaseException], None]) -> None:
        self._on_error = on_error
        self._param: weakref.ref[torch.Tensor] | None = None
        self._handle: RemovableHandle | None = None
        self._finite: torch.Tensor | None = None
        self.holding = False  # a reading waits to be taken

    @property
    def key(self) -> int | None:
        """``id`` of the parameter probed, if armed and alive."""
        param = self._param() if self._param is not None else None
        return None if param is None else id(param)

    def arm(self, param: torch.Tensor) -> None:
        """Probe ``param`` from its next backward on (and nothing else)."""
        if self.key == id(param) or not param.requires_grad:
            return
        self.remove()
        self._param = weakref.ref(param)
        self._handle = param.register_post_accumulate_grad_hook(  # type: ignore[no-untyped-call]
            self._on_accumulate
        )

    def take(self) -> torch.Tensor | None:
        """The finiteness (a one-element bool tensor) the last backward left, then forget it."""
        finite, self._finite = self._finite, None
        self.holding = False
        return finite

    def remove(self) -> None:
        """Disarm; idempotent."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._param = None
        self._finite = None
        self.holding = False

    def _on_accumulate(self, param: torch.Tensor) -> None:
        try:
            grad = param.grad
            if grad is not None and not grad.is_sparse:
                with torch.no_grad():
                    self._finite = torch.isfinite(local(grad)).all()
                self.holding = True
        except Exception as exc:
            self.remove()
            self._on_error(exc)


def grad_norms(
    params: list[torch.Tensor], scale: torch.Tensor | None, skipped: torch.Tensor | None
) -> Readback | None:
    """Queue the 2-norm of each of ``params``' gradients, divided by ``scale``, then a
    skipped-step flag.

    ``scale`` is a GradScaler's scale when the gradients are still scaled at
    step time (fused optimizers); ``skipped`` its found-inf tensor, nonzero
    when the scaler is skipping this step. Holds no gradient past the call.
    """
    grads: list[torch.Tensor] = list(map(_GRAD, params))
    plain = _plain(grads)  # the usual case: one pass of one op, below
    if not (plain or _one_device(grads)):
        return None
    with torch.no_grad():
        if plain:
            norms, order = torch.stack(torch._foreach_norm(grads)), None
        else:
            norms, order = _norms(grads)
        if scale is not None:
            norms = norms / scale.to(device=norms.device, dtype=norms.dtype)
        if skipped is None:  # not skipping: the flag is known here, no op needed
            return Readback(norms, order, tail=(0.0,))
        flag = skipped.to(device=norms.device, dtype=norms.dtype).reshape(1)
        return Readback(torch.cat([norms, flag]), order)


class NormHistory:
    """Tells an explosion of the total gradient norm from the variance of healthy training.

    Two shapes are explosions (GG202):

    * a jump: a norm at least ``factor`` times the largest of any earlier step
      (an outlier batch, a loss singularity, a learning rate far too high);
    * sustained growth: a norm that rose at each of at least ``streak`` steps
      in a row, by ``factor`` in all since the rise began (divergence).

    Healthy training varies far less against those baselines, even where the
    norm moves a lot against its median: an actor-critic loss summed over
    episodes that grow from 10 to 500 steps jumped at most 7x past its
    largest earlier norm, and rose at most 7x over a run of rising steps; a
    converged model moved to a new target (two-stage training) came back to
    at most 5x the norms of its first stage; no healthy run jumped even 3x in
    its first steps, so judging starts at the second. Steps found exploding
    do not raise the baseline, and non-finite norms (GG201's business) never
    enter it.

    A step whose gradients a clip rescaled applies a bounded update: its norm
    is the one backward produced, and a jump counts only once it has lasted
    ``tamed_for`` such steps in a row. A bad batch tamed by clipping is not an
    explosion; a run whose raw norm stays orders of magnitude up is.
    """

    def __init__(
        self,
        factor: float,
        max_norm: float | None,
        warmup: int = 1,
        streak: int = 6,
        tamed_for: int = 3,
    ) -> None:
        self.factor = factor
        self.max_norm = max_norm
        self.warmup = warmup
        self.streak = streak
        self.tamed_for = tamed_for
        self._seen = 0
        self._peak = 0.0  # the largest total norm of any earlier step not found exploding
        self._last: float | None = None
        self._rising = 0  # steps in a row the norm rose
        self._rise_from = 0.0  # the norm the current rise started from
        self._high = 0  # tamed steps in a row far above the peak

    def judge(self, total: float, *, tamed: bool = False) -> str | None:
        """Record ``total``; return why it is exploding, or ``None``.

        ``tamed``: the step's gradients were rescaled in place (clipped)
        after backward, and ``total`` is the norm backward left.
        """
        if not math.isfinite(total):
            # GG201's business if the step applies it; before a clip or a
            # nan_to_num_, what backward left. Either way it breaks a rise.
            self._last = None
            return None
        if self._last is not None and total > self._last:
            self._rising += 1
        else:
            self._rising, self._rise_from = 0, total
        self._last = total
        judged = self._seen >= self.warmup
        jump = judged and self._peak > 0 and total >= self.factor * self._peak
        self._high = self._high + 1 if jump and tamed else 0
        verdict = None
        if self.max_norm is not None and total > self.max_norm and not tamed:
            verdict = f"total norm {total:.3g} > max_grad_norm {self.max_norm:g}"
        elif jump and not tamed:
            verdict = (
                f"total norm {total:.3g} is {total / self._peak:.3g}x "
                f"the largest of any earlier step, {self._peak:.3g}"
            )
        elif jump and self._high >= self.tamed_for:
            verdict = (
                f"total norm {total:.3g} before clipping, {total / self._peak:.3g}x "
                f"the largest of any earlier step ({self._peak:.3g}), "
                f"{self._high} clipped steps in a row"
            )
        elif judged and self._rising >= self.streak and total >= self.factor * self._rise_from:
            clipped = " before clipping" if tamed else ""
            verdict = (
                f"total norm {total:.3g}{clipped} rose at each of the last "
                f"{self._rising} steps, {total / self._rise_from:.3g}x in all"
            )
        self._seen += 1
        if verdict is None and not jump:
            self._peak = max(self._peak, total)
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
    """How often the numeric checks run: every ``every`` steps, or by a fixed rule.

    With ``every=None`` they run every step, except on a CPU with more than
    ``per_step`` gradient tensors, where the norm pass is a loop over tensors
    that costs a few microseconds each: there every ``ceil(n / per_step)``-th
    step. The rule depends only on the model, so a run is reproducible.
    """

    def __init__(self, every: int | None, per_step: int = 256) -> None:
        self.every = every
        self.per_step = per_step
        self._count = 0

    def due(self, params: list[torch.Tensor]) -> bool:
        """Count one step; whether the checks run on it for these parameters' gradients."""
        self._count += 1
        if self.every is None and len(params) <= self.per_step:
            return True  # `period` is 1, inline: this runs at every step
        return (self._count - 1) % self.period(params) == 0

    def next_due(self, params: list[torch.Tensor]) -> bool:
        """Whether the checks will run on the next step (without counting it)."""
        return self._count % self.period(params) == 0

    def period(self, params: list[torch.Tensor]) -> int:
        """Steps between two checks for the gradients of ``params`` (on their device)."""
        if self.every is not None:
            return self.every
        if len(params) <= self.per_step or params[0].device.type != "cpu":
            return 1
        return math.ceil(len(params) / self.per_step)


_ENGINE: Any = torch.autograd.Variable._execution_engine


class BackwardNorms:
    """The gradients' norms as backward left them, before a clip rescales them (GG202).

    Armed once a guard sees gradients rescaled in place between backward and
    step: a post-accumulate hook on one parameter (the sentinel) queues a
    callback for the end of each backward, which takes the norms of the
    gradients in one batched pass. With several backward passes per step, only
    from the one expected to be the last of the window (as many as the last
    window had), so accumulation does not multiply the passes.
    """

    def __init__(
        self,
        collect: Callable[[], list[torch.Tensor] | None],
        on_error: Callable[[BaseException], None],
    ) -> None:
        # ``collect`` returns the parameters whose gradients to norm, or None
        # when no pass is due for the next step.
        self._collect = collect
        self._on_error = on_error
        self._handle: RemovableHandle | None = None
        self.armed = False  # the sentinel is hooked
        self._queued = False
        self.window = 1  # backward passes per step, as the last step had
        self._passes = 0  # since the last take
        self._taken: tuple[Readback, list[weakref.ref[torch.Tensor]]] | None = None

    def arm(self, sentinel: torch.Tensor) -> None:
        """Take the norms from the next backward into ``sentinel`` on; once."""
        if self._handle is None and sentinel.requires_grad:
            self._handle = sentinel.register_post_accumulate_grad_hook(  # type: ignore[no-untyped-call]
                self._on_sentinel
            )
            self.armed = True

    def take(self) -> tuple[Readback, list[weakref.ref[torch.Tensor]]] | None:
        """The norms the last backward since the previous take left, and their parameters."""
        taken, self._taken = self._taken, None
        self._passes = 0
        return taken

    def remove(self) -> None:
        """Disarm; idempotent."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.armed = False
        self._taken = None

    def _on_sentinel(self, param: torch.Tensor) -> None:
        if self._queued:
            return
        try:
            _ENGINE.queue_callback(self._ended)
            self._queued = True
        except Exception as exc:  # no callbacks here (a compiled backward): nothing to take
            self.remove()
            self._on_error(exc)

    def _ended(self) -> None:
        self._queued = False
        self._passes += 1
        if self._passes < self.window:
            return
        try:
            params = self._collect()
            if not params:
                return
            readback = grad_norms(params, None, None)
            if readback is not None:
                self._taken = (readback, [weakref.ref(p) for p in params])
        except Exception as exc:
            self.remove()
            self._on_error(exc)


class ModuleNorms:
    """Groups per-parameter norms by the model's top-level module, on the host.

    A parameter named ``encoder.0.weight`` belongs to ``encoder``. With more
    than ``limit`` modules, the ``limit`` largest (by parameter count) are kept
    and the rest are folded into ``"(other)"``, so every step shows the same
    lines and the squares of the module norms still add up to the total.
    """

    OTHER = "(other)"

    def __init__(self, limit: int = 8) -> None:
        self.limit = limit
        self._group: dict[int, int] = {}  # id(param) -> index into _names
        self._names: list[str] = []
        self._sizes: list[int] = []
        self._shown: list[str] | None = None  # per group: the name it is shown under

    def missing(self, params: list[torch.Tensor | None]) -> list[torch.Tensor]:
        """The parameters among ``params`` whose module is not known yet."""
        return [p for p in params if p is not None and id(p) not in self._group]

    def add(self, params: list[torch.Tensor], names: tuple[str, ...]) -> None:
        """Learn the modules of ``params`` from their qualified ``names``."""
        index = {n: i for i, n in enumerate(self._names)}
        for p, name in zip(params, names, strict=True):
            module = name.split(".", 1)[0]
            i = index.get(module)
            if i is None:
                i = index[module] = len(self._names)
                self._names.append(module)
                self._sizes.append(0)
            self._group[id(p)] = i
            self._sizes[i] += p.numel()
        self._shown = None

    def aggregate(
        self, params: list[torch.Tensor | None], norms: list[float]
    ) -> tuple[float | None, dict[str, float | None]]:
        """The total norm and each module's, ``None`` where not finite (JSON has no NaN)."""
        shown = self._shown if self._shown is not None else self._pick()
        squares: dict[str, float] = {}
        total = 0.0
        for p, n in zip(params, norms, strict=True):
            sq = n * n
            total += sq
            i = self._group.get(id(p)) if p is not None else None
            name = shown[i] if i is not None else self.OTHER
            squares[name] = squares.get(name, 0.0) + sq
        order = sorted(squares, key=lambda name: name == self.OTHER)
        return _finite_sqrt(total), {name: _finite_sqrt(squares[name]) for name in order}

    def _pick(self) -> list[str]:
        if len(self._names) <= self.limit:
            shown = list(self._names)
        else:
            largest = sorted(range(len(self._names)), key=lambda i: -self._sizes[i])
            keep = set(largest[: self.limit])
            shown = [n if i in keep else self.OTHER for i, n in enumerate(self._names)]
        self._shown = shown
        return shown


def _finite_sqrt(square: float) -> float | None:
    return math.sqrt(square) if math.isfinite(square) else None
