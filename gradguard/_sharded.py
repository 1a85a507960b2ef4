"""Fully sharded data parallelism: FSDP2's DTensor gradients and FSDP1's flat parameters.

FSDP2 (``fully_shard``) gives the optimizer sharded DTensor parameters, whose
gradients are DTensors too. Their values cannot be read on the host, and a
DTensor has two version counters: its own, moved by in-place ops on it (a
clear with ``set_to_none=False``, ``p.grad.zero_()``), and its local shard's,
moved when FSDP2 adds a reduce-scattered gradient straight into the shard
(``grad._local_tensor += g``). The shards of one FSDP2 parameter group are
views into one reduce-scatter output, so they share that local counter.
gradguard reads every gradient through `local` (this rank's values) and
`version_of` (both counters).

Under ``set_requires_gradient_sync(False)`` FSDP2 writes no sharded gradient:
each backward accumulates into the unsharded parameter's own gradient (a
separate autograd leaf), and the next backward that syncs reduce-scatters the
sum into the sharded one, firing its post-accumulate hook once for the whole
window. A hook on the unsharded parameter counts the window's micro-batches.

FSDP1 (``FullyShardedDataParallel(use_orig_params=True)``) never runs the
original parameters' post-accumulate hooks: autograd writes into the flat
parameter, and at the end of the backward FSDP1 points each original
parameter's ``.grad`` at a new view into the flat parameter's sharded gradient
(onto the old one's memory when it accumulates). A post-accumulate hook on the
flat parameter stands in for theirs.

Both are found through FSDP's own bookkeeping (private attributes, looked up
defensively): a torch that renames them leaves the counting of unsynced
micro-batches and FSDP1's tracking off, never the training broken.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import nn

_TENSOR = torch.Tensor


def local(grad: torch.Tensor) -> torch.Tensor:
    """The tensor holding this rank's values of ``grad``: a DTensor's local shard, else itself."""
    if type(grad) is _TENSOR:
        return grad
    shard = getattr(grad, "_local_tensor", None)
    return shard if isinstance(shard, torch.Tensor) else grad


def version_of(grad: torch.Tensor) -> int:
    """A counter that moves whenever ``grad`` is changed in place, by anyone.

    A DTensor's own counter and its local shard's: FSDP2's accumulation moves
    only the second, in-place ops on the DTensor only the first.
    """
    if type(grad) is _TENSOR:
        return grad._version
    shard = getattr(grad, "_local_tensor", None)
    if isinstance(shard, torch.Tensor):
        return grad._version + shard._version
    return grad._version


def is_dtensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (FSDP2's sharded parameters and gradients)."""
    return type(tensor) is not _TENSOR and hasattr(tensor, "_local_tensor")


def is_sharded(param: torch.Tensor) -> bool:
    """Whether FSDP shards ``param`` across ranks: FSDP2's DTensors, FSDP1's flattened ones.

    FSDP1 marks every parameter it flattens, and its flat parameters, with
    ``_fsdp_flattened``.
    """
    return is_dtensor(param) or bool(getattr(param, "_fsdp_flattened", False))


class Sources(NamedTuple):
    """What autograd writes to on behalf of the optimizer's sharded parameters.

    Attributes:
        unsharded: FSDP2: ``id`` of a sharded parameter -> its unsharded
            parameter, or ``None`` before the first forward creates it.
        flat: FSDP1: ``id`` of an original parameter -> the flat parameter
            holding it.
    """

    unsharded: dict[int, torch.Tensor | None]
    flat: dict[int, torch.Tensor]


def sources(models: Iterable[nn.Module]) -> Sources:
    """The FSDP2 unsharded and FSDP1 flat parameters behind the modules of ``models``."""
    found = Sources({}, {})
    if "torch.distributed.fsdp" not in sys.modules:
        return found  # neither FSDP was ever imported
    for model in models:
        for module in model.modules():
            _fsdp2(module, found.unsharded)
            _fsdp1(module, found.flat)
    return found


def _fsdp2(module: nn.Module, out: dict[int, torch.Tensor | None]) -> None:
    state_of = getattr(module, "_get_fsdp_state", None)
    if state_of is None:
        return
    group = getattr(state_of(), "_fsdp_param_group", None)
    for fsdp_param in getattr(group, "fsdp_params", None) or ():
        sharded = getattr(fsdp_param, "sharded_param", None)
        if isinstance(sharded, torch.Tensor):
            unsharded = getattr(fsdp_param, "_unsharded_param", None)
            out[id(sharded)] = unsharded if isinstance(unsharded, torch.Tensor) else None


def _fsdp1(module: nn.Module, out: dict[int, torch.Tensor]) -> None:
    handle = getattr(module, "_handle", None)
    flat = getattr(handle, "flat_param", None)
    if not isinstance(flat, torch.Tensor):
        return
    for param in getattr(flat, "_params", None) or ():  # None without use_orig_params
        out[id(param)] = flat
