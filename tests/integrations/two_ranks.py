"""What the two-process workers (``ddp_worker.py``, ``fsdp_worker.py``) share.

Each worker registers its scenarios, spawns 2 gloo ranks on the loopback
interface, runs every scenario in order on each rank and writes
``OUTDIR/rank-{rank}.json``: per scenario, the findings its guard reported.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import gradguard

STEPS = 6
ACCUM = 3
Result = dict[str, Any]
Scenario = Callable[[int], Result]


class Scenarios(dict[str, Scenario]):
    """A worker's scenarios by name, in the order they run."""

    def add(self, fn: Scenario) -> Scenario:
        """Register ``fn(rank)`` under its name (a decorator)."""
        self[fn.__name__] = fn
        return fn


class Net(nn.Module):
    """Two layers, so a finding can name a subset of parameters.

    With ``extra``, a third layer the forward never uses.
    """

    def __init__(self, extra: bool = False) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 8)
        self.head = nn.Linear(8, 2)
        self.extra = nn.Linear(8, 8) if extra else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.encoder(x)))


def batch(rank: int, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Different data on each rank and micro-batch, as a sampler would give."""
    g = torch.Generator().manual_seed(1000 * rank + i)
    return torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)


def loss_of(net: nn.Module, rank: int, i: int, scale: float = 1.0) -> torch.Tensor:
    """Mean squared error on this rank's ``i``-th micro-batch (targets times ``scale``)."""
    x, y = batch(rank, i)
    return nn.functional.mse_loss(net(x), y * scale)


@contextlib.contextmanager
def guarded(opt: torch.optim.Optimizer, net: nn.Module, **kw: Any) -> Iterator[gradguard.Guard]:
    """A log-mode guard for one scenario."""
    with gradguard.guarding(opt, model=net, mode=kw.pop("mode", "log"), **kw) as g:
        yield g


def plain_loop(
    rank: int,
    net: nn.Module,
    *,
    params: Iterable[torch.Tensor] | None = None,
    set_to_none: bool = True,
    skip_zero_on: int | None = None,
    clear_after_backward_on: int | None = None,
    clear_model: bool = False,
    clear_by_hand: bool = False,
    clip: bool = False,
    before: Callable[[int], None] | None = None,
    **guard: Any,
) -> Result:
    """``STEPS`` steps of one micro-batch each, SGD over ``params`` (all of ``net``'s).

    Bugs are injected on one rank only; ``before(i)`` runs at the start of
    step ``i``; ``guard`` goes to the guard.
    """
    opt = torch.optim.SGD(net.parameters() if params is None else params, lr=0.05)
    with guarded(opt, net, **guard) as g:
        for i in range(STEPS):
            if before is not None:
                before(i)
            if rank != skip_zero_on:
                if clear_by_hand:
                    for p in net.parameters():
                        if p.grad is not None:
                            p.grad.zero_()  # no wrapper sees this clear
                elif clear_model:
                    net.zero_grad(set_to_none=set_to_none)
                else:
                    opt.zero_grad(set_to_none=set_to_none)
            loss_of(net, rank, i).backward()
            if rank == clear_after_backward_on:
                opt.zero_grad(set_to_none=set_to_none)
            if clip:
                torch.nn.utils.clip_grad_norm_(net.parameters(), 0.1)
            opt.step()
    return findings(g)


def findings(g: gradguard.Guard) -> Result:
    """What a guard found, as JSON."""
    return {
        "findings": [
            {"code": f.code, "step": f.step, "params": list(f.params), "message": f.message}
            for f in g.findings
        ]
    }


def run_scenarios(
    scenarios: Scenarios, rank: int, world: int, port: int, outdir: str, only: list[str]
) -> None:
    """One rank: every scenario (or those in ``only``) in order, on one process group."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results: dict[str, Result] = {}
    try:
        for name, fn in scenarios.items():
            if only and name not in only:
                continue
            try:
                results[name] = fn(rank)
            except Exception as exc:  # recorded, so the test names the scenario
                results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            dist.barrier()
    finally:
        with open(os.path.join(outdir, f"rank-{rank}.json"), "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
        dist.destroy_process_group()


def spawn(run: Callable[[int, int, int, str, list[str]], None]) -> None:
    """Spawn two ranks of ``run(rank, world, port, outdir, only)`` on a free loopback port.

    ``run`` must be a module-level function of the worker (spawned processes
    import it by name); the command line is ``OUTDIR [SCENARIO ...]``.
    """
    outdir, only = sys.argv[1], sys.argv[2:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.set_num_threads(1)
    mp.spawn(run, args=(2, port, outdir, only), nprocs=2)
