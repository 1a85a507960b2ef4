"""GG401 rank-divergence: are data-parallel replicas about to apply the same gradients?

After DistributedDataParallel's all-reduce every rank holds the same averaged
gradients, so a correct step applies identical updates everywhere. A
``no_sync()`` window that is off by one micro-batch, or a sync flag toggled
around backward only, leaves each rank with its own gradients: the replicas
drift apart with no error.

Every ``check_ranks_every`` steps each rank reduces the gradients it is about
to apply to a fingerprint of fixed size: its step, its parameter count, how
many of them have no gradient, and the squared gradient norms summed into
`BUCKETS` buckets of consecutive parameters (one per parameter for models
with up to 64 of them). The ranks exchange fingerprints with one
``all_gather`` of ``(3 + 64)`` float64 numbers each, on a gloo group of
gradguard's own, posted asynchronously in step order so it can never pair up
with the training's collectives. Each rank then compares them, so every rank
reports the divergence.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import math
import threading
from typing import Any

import torch
import torch.distributed as dist

from gradguard._dispatch import _log
from gradguard._health import Readback, _norms
from gradguard._process import Flag, keep

BUCKETS = 64
HEADER = 3  # step, parameter count, parameters without a gradient
RTOL = 1e-4  # replicas hold bit-identical gradients; leave room for reduction order
TIMEOUT = datetime.timedelta(minutes=5)
SIZE = HEADER + BUCKETS

_LOCK = threading.Lock()
# The default group it was made for -> our gloo group (one entry).
_GROUP: dict[str, tuple[Any, Any]] = keep("rank group", {}, cache=True)
_QUEUE: collections.deque[Exchange] = keep("rank exchanges", collections.deque())  # not posted
_BROKEN = keep("rank check broken", Flag())  # a collective failed: pairing is lost for the run


def world() -> int:
    """The number of ranks when ``torch.distributed`` is initialised, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _group() -> Any:
    """A gloo group over all ranks, made once per default process group.

    Creating a group is itself collective, so it happens at the first check,
    which every rank reaches at the same step.
    """
    with _LOCK:
        default = dist.group.WORLD
        made = _GROUP.get("group")
        if made is None or made[0] is not default:
            made = _GROUP["group"] = (default, dist.new_group(backend="gloo", timeout=TIMEOUT))
        return made[1]


def fingerprint(grads: list[torch.Tensor | None], step: int) -> torch.Tensor | None:
    """``SIZE`` float64 numbers summarising ``grads``; ``None`` when they span devices."""
    dense = [i for i, g in enumerate(grads) if g is not None and not g.is_sparse]
    devices = {grads[i].device for i in dense}  # type: ignore[union-attr]
    if len(devices) > 1:
        return None
    device = devices.pop() if devices else torch.device("cpu")
    count = len(grads)
    missing = sum(1 for g in grads if g is None)
    with torch.no_grad():
        squares = torch.zeros(max(count, 1), dtype=torch.float64, device=device)
        if dense:
            norms, order = _norms([grads[i] for i in dense])  # type: ignore[misc]
            norms = norms.to(torch.float64)
            placed = dense if order is None else [dense[k] for k in order]
            index = torch.tensor(placed, device=device)
            squares.index_copy_(0, index, norms * norms)
        buckets = torch.zeros(BUCKETS, dtype=torch.float64, device=device)
        owner = torch.tensor([bucket_of(i, count) for i in range(max(count, 1))], device=device)
        buckets.index_add_(0, owner, squares)
        header = torch.tensor([step, count, missing], dtype=torch.float64, device=device)
        return torch.cat([header, buckets])


def bucket_of(index: int, count: int) -> int:
    """The bucket that parameter ``index`` of ``count`` adds its squared norm to."""
    return index if count <= BUCKETS else index * BUCKETS // count


class Exchange:
    """One rank check in flight: the local fingerprint, then everyone's.

    Readable like a `Readback`: `ready` never waits, `values` waits for the
    other ranks only when it must (strict mode, closing).
    """

    def __init__(self, local: torch.Tensor, group: Any, ranks: int) -> None:
        self.ranks = ranks
        self._local: Readback | None = Readback(local)
        self._group = group
        self._out: list[torch.Tensor] = []
        self._work: Any = None
        self._failed = False
        _QUEUE.append(self)
        _post_ready()

    def _post(self) -> None:
        local, self._local = self._local, None
        if local is None or _BROKEN.value:
            self._failed = True
            return
        try:
            host = torch.tensor(local.values(), dtype=torch.float64)
            self._out = [torch.empty_like(host) for _ in range(self.ranks)]
            self._work = dist.all_gather(self._out, host, group=self._group, async_op=True)
        except Exception as exc:
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        self._failed = True
        if not _BROKEN.value:
            _BROKEN.value = True
            _log().warning(
                "rank-check-failed",
                error=f"{type(exc).__name__}: {exc}",
                note="GG401 checks are off for the rest of this run; training continues",
            )

    def ready(self) -> bool:
        """Whether every rank's fingerprint has arrived (or the exchange failed)."""
        _post_ready()
        if self._failed:
            return True
        if self._work is None:
            return False
        try:
            return bool(self._work.is_completed())
        except Exception as exc:
            self._fail(exc)
            return True

    def values(self) -> list[float]:
        """Every rank's fingerprint, rank by rank; empty if the exchange failed."""
        _post_until(self)
        if self._failed:
            return []
        try:
            self._work.wait()
        except Exception as exc:
            self._fail(exc)
            return []
        return [float(v) for t in self._out for v in t.tolist()]  # sync-ok: gloo, host memory


def _post_ready() -> None:
    """Post queued exchanges in the order they were made, while their fingerprint is readable."""
    while _QUEUE and (_QUEUE[0]._local is None or _QUEUE[0]._local.ready()):
        _QUEUE.popleft()._post()


def _post_until(exchange: Exchange) -> None:
    """Post every exchange made up to ``exchange``, waiting for the device if needed."""
    while _QUEUE and exchange in _QUEUE:
        _QUEUE.popleft()._post()


def start(grads: list[torch.Tensor | None], step: int) -> Exchange | None:
    """Begin comparing ``grads`` across ranks; ``None`` when there is nothing to compare."""
    ranks = world()
    if ranks < 2 or _BROKEN.value:
        return None
    local = fingerprint(grads, step)
    if local is None:
        return None
    try:
        group = _group()
    except Exception as exc:
        _BROKEN.value = True
        _log().warning(
            "rank-check-failed",
            error=f"{type(exc).__name__}: {exc}",
            note="GG401 needs a gloo group; checks are off; training continues",
        )
        return None
    return Exchange(local, group, ranks)


@dataclasses.dataclass(frozen=True)
class Divergence:
    """Which ranks disagree, about which parameters (by index), and how."""

    params: list[int]
    detail: str


def compare(values: list[float], ranks: int) -> Divergence | None:
    """Compare every rank's fingerprint; ``None`` when they all agree.

    The ranks that agree with the most others are the reference; the
    parameters named are those whose buckets differ most.
    """
    if len(values) != ranks * SIZE:
        return None
    rows = [values[r * SIZE : (r + 1) * SIZE] for r in range(ranks)]
    groups: list[list[int]] = []
    for r, row in enumerate(rows):
        for group in groups:
            if _same(rows[group[0]], row):
                group.append(r)
                break
        else:
            groups.append([r])
    if len(groups) == 1:
        return None
    majority = max(groups, key=len)  # ties: the group holding the lowest rank
    odd = sorted(r for g in groups if g is not majority for r in g)
    ref = rows[majority[0]]
    steps = sorted({int(row[0]) for row in rows})
    counts = sorted({int(row[1]) for row in rows})
    who = f"rank{'s' if len(odd) > 1 else ''} {_join(odd)} differ{'s' if len(odd) == 1 else ''}"
    who += f" from rank{'s' if len(majority) > 1 else ''} {_join(majority)}"
    if len(steps) > 1:
        return Divergence([], f"{who}: ranks are at different steps {steps}")
    if len(counts) > 1:
        return Divergence([], f"{who}: ranks hold different parameter counts {counts}")
    count = counts[0]
    scores = []
    for b in range(BUCKETS):
        diff = max(_relative(ref[HEADER + b], rows[r][HEADER + b]) for r in odd)
        if diff > RTOL:
            scores.append((diff, b))
    scores.sort(reverse=True)
    if not scores:
        detail = f"{who}: ranks disagree on which parameters have a gradient"
        return Divergence([], detail)
    top = scores[0][1]
    worst = odd[0]
    detail = (
        f"{who}; largest gap in gradient norm: {math.sqrt(max(ref[HEADER + top], 0.0)):.4g} on "
        f"rank {majority[0]} vs {math.sqrt(max(rows[worst][HEADER + top], 0.0)):.4g} "
        f"on rank {worst}"
    )
    params = [i for _, b in scores for i in range(count) if bucket_of(i, count) == b]
    return Divergence(params, detail)


def _same(a: list[float], b: list[float]) -> bool:
    return a[:HEADER] == b[:HEADER] and all(
        _relative(x, y) <= RTOL for x, y in zip(a[HEADER:], b[HEADER:], strict=True)
    )


def _relative(a: float, b: float) -> float:
    if math.isnan(a) or math.isnan(b):
        return 0.0 if math.isnan(a) and math.isnan(b) else math.inf
    scale = max(abs(a), abs(b))
    if scale == 0.0:
        return 0.0
    if not math.isfinite(scale):
        return 0.0 if a == b else math.inf
    return abs(a - b) / scale


def _join(ranks: list[int]) -> str:
    return ", ".join(str(r) for r in ranks)
