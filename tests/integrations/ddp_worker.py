"""Two-process DistributedDataParallel scenarios (gloo, loopback), run once per test session.

``python ddp_worker.py OUTDIR`` spawns 2 ranks; each runs every scenario in
order on one process group and writes ``OUTDIR/rank-{rank}.json`` with, per
scenario, the findings its guard reported. The tests in ``test_ddp.py`` and
``test_ranks.py`` assert on those files. Running all scenarios in one pair of
processes keeps the cost of starting torch twice per session, not per test.
"""

from __future__ import annotations

import contextlib
from typing import Any

import structlog
import torch
import two_ranks
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel as DDP
from two_ranks import (
    ACCUM,
    STEPS,
    Net,
    Result,
    Scenarios,
    findings,
    guarded,
    loss_of,
    run_scenarios,
    spawn,
)

import gradguard

SCENARIOS = Scenarios()
scenario = SCENARIOS.add


def model(bucket_view: bool = False) -> DDP:
    """The same initial weights on every rank, wrapped in DDP."""
    torch.manual_seed(0)
    return DDP(Net(), gradient_as_bucket_view=bucket_view)


def plain_loop(rank: int, *, bucket_view: bool, **kw: Any) -> Result:
    """One micro-batch per step on DDP (`two_ranks.plain_loop`); bugs on one rank only."""
    return two_ranks.plain_loop(rank, model(bucket_view), **kw)


for _bv in (False, True):
    for _stn in (True, False):
        _suffix = f"{'bucket_view' if _bv else 'copy'}_{'none' if _stn else 'zeros'}"

        def _correct(rank: int, bv: bool = _bv, stn: bool = _stn) -> Result:
            return plain_loop(rank, bucket_view=bv, set_to_none=stn)

        def _model_clear(rank: int, bv: bool = _bv, stn: bool = _stn) -> Result:
            return plain_loop(rank, bucket_view=bv, set_to_none=stn, clear_model=True)

        SCENARIOS[f"correct_{_suffix}"] = _correct
        SCENARIOS[f"correct_model_zero_grad_{_suffix}"] = _model_clear

    _kind = "bucket_view" if _bv else "copy"

    def _missing(rank: int, bv: bool = _bv) -> Result:
        return plain_loop(rank, bucket_view=bv, skip_zero_on=1)

    def _cleared(rank: int, bv: bool = _bv) -> Result:
        return plain_loop(rank, bucket_view=bv, clear_after_backward_on=1)

    def _by_hand(rank: int, bv: bool = _bv) -> Result:
        return plain_loop(rank, bucket_view=bv, clear_by_hand=True)

    SCENARIOS[f"correct_clear_by_hand_{_kind}"] = _by_hand
    SCENARIOS[f"missing_zero_grad_on_rank1_{_kind}"] = _missing
    SCENARIOS[f"cleared_before_step_on_rank1_{_kind}"] = _cleared


def accumulation_loop(
    rank: int,
    *,
    bucket_view: bool,
    set_to_none: bool,
    no_sync: str,
    declare: bool = True,
    model_clear_inside_on: int | None = None,
    check_ranks_every: int | None = None,
    mode: str = "log",
) -> Result:
    """``ACCUM`` micro-batches per step under a ``no_sync`` policy.

    ``no_sync``: ``"none"`` syncs every micro-batch (correct, wasteful);
    ``"all_but_last"`` is the correct use; ``"off_by_one"`` is FunASR's bug
    (``i % accum != 0`` under no_sync: the first micro-batch syncs, the one
    that steps does not); ``"flag_around_backward"`` is nanoGPT's bug
    (``require_backward_grad_sync`` set after the forward, so the last
    micro-batch's forward was prepared without sync).
    """
    ddp = model(bucket_view)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    kw: dict[str, Any] = {"accumulation_steps": ACCUM if declare else None}
    with guarded(opt, ddp, check_ranks_every=check_ranks_every, mode=mode, **kw) as g:
        for step in range(STEPS):
            opt.zero_grad(set_to_none=set_to_none)
            for k in range(ACCUM):
                i = step * ACCUM + k
                if no_sync == "all_but_last":
                    quiet = k < ACCUM - 1
                elif no_sync == "off_by_one":
                    quiet = k % ACCUM != 0
                else:
                    quiet = False
                if no_sync == "flag_around_backward":
                    loss = loss_of(ddp, rank, i)
                    ddp.require_backward_grad_sync = k == ACCUM - 1
                    loss.backward()
                    continue
                ctx = ddp.no_sync() if quiet else contextlib.nullcontext()
                with ctx:
                    loss = loss_of(ddp, rank, i)
                    if rank == model_clear_inside_on and k > 0:
                        ddp.zero_grad()  # alpaca_farm: a model-level clear inside the window
                    loss.backward()
            opt.step()
    return findings(g)


for _bv in (False, True):
    _kind = "bucket_view" if _bv else "copy"
    for _stn in (True, False):
        _zeros = "none" if _stn else "zeros"
        for _policy in ("none", "all_but_last"):

            def _acc(rank: int, bv: bool = _bv, stn: bool = _stn, policy: str = _policy) -> Result:
                return accumulation_loop(rank, bucket_view=bv, set_to_none=stn, no_sync=policy)

            SCENARIOS[f"accumulate_sync_{_policy}_{_kind}_{_zeros}"] = _acc

    def _undeclared(rank: int, bv: bool = _bv) -> Result:
        return accumulation_loop(
            rank, bucket_view=bv, set_to_none=True, no_sync="all_but_last", declare=False
        )

    def _inside(rank: int, bv: bool = _bv) -> Result:
        return accumulation_loop(
            rank, bucket_view=bv, set_to_none=True, no_sync="all_but_last", model_clear_inside_on=1
        )

    SCENARIOS[f"accumulate_undeclared_{_kind}"] = _undeclared
    SCENARIOS[f"model_zero_grad_inside_window_on_rank1_{_kind}"] = _inside


@scenario
def ranks_correct_no_sync(rank: int) -> Result:
    """GG401 on every step of a correct no_sync accumulation: silent."""
    return accumulation_loop(
        rank, bucket_view=True, set_to_none=True, no_sync="all_but_last", check_ranks_every=1
    )


@scenario
def ranks_off_by_one_no_sync(rank: int) -> Result:
    """FunASR's off-by-one no_sync window: the ranks step on different gradients."""
    return accumulation_loop(
        rank, bucket_view=False, set_to_none=True, no_sync="off_by_one", check_ranks_every=2
    )


@scenario
def ranks_sync_flag_around_backward(rank: int) -> Result:
    """nanoGPT's require_backward_grad_sync set after the forward: no sync at all."""
    return accumulation_loop(
        rank,
        bucket_view=True,
        set_to_none=True,
        no_sync="flag_around_backward",
        check_ranks_every=3,
    )


@scenario
def ranks_off_by_one_strict(rank: int) -> Result:
    """In strict mode GG401 raises at the step, on every rank, before the update."""
    try:
        accumulation_loop(
            rank,
            bucket_view=False,
            set_to_none=True,
            no_sync="off_by_one",
            check_ranks_every=1,
            mode="strict",
        )
    except gradguard.RankDivergenceError as exc:
        finding = exc.finding
        return {"raised": finding and finding.code, "step": finding and finding.step}
    return {"raised": None}


@scenario
def zero_redundancy_correct(rank: int) -> Result:
    """ZeroRedundancyOptimizer (each rank steps its shard, then broadcasts): silent."""
    ddp = model()
    opt = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=torch.optim.Adam, lr=1e-3)
    with guarded(opt, ddp) as g:
        for i in range(STEPS):
            opt.zero_grad()
            loss_of(ddp, rank, i).backward()
            opt.step()
    return findings(g)


@scenario
def zero_redundancy_missing_zero_grad_on_rank1(rank: int) -> Result:
    """ZeroRedundancyOptimizer with zero_grad forgotten on rank 1: rank 1 reports it."""
    ddp = model()
    opt = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=torch.optim.Adam, lr=1e-3)
    with guarded(opt, ddp) as g:
        for i in range(STEPS):
            if rank != 1:
                opt.zero_grad()
            loss_of(ddp, rank, i).backward()
            opt.step()
    return findings(g)


@scenario
def find_unused_parameters_correct(rank: int) -> Result:
    """find_unused_parameters=True with a branch used every other step: silent."""

    class Branchy(Net):
        def __init__(self) -> None:
            super().__init__()
            self.extra = nn.Linear(8, 8)
            self.use_extra = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.tanh(self.encoder(x))
            return self.head(self.extra(h) if self.use_extra else h)

    torch.manual_seed(0)
    net = Branchy()
    ddp = DDP(net, find_unused_parameters=True, gradient_as_bucket_view=True)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    with guarded(opt, ddp, unused_after=50) as g:
        for i in range(STEPS):
            net.use_extra = i % 2 == 1
            opt.zero_grad()
            loss_of(ddp, rank, i).backward()
            opt.step()
    return findings(g)


@scenario
def events_carry_rank(rank: int) -> Result:
    """A finding's structlog event carries rank and world_size."""
    with structlog.testing.capture_logs() as logs:
        result = plain_loop(rank, bucket_view=False, skip_zero_on=rank)
    events = [e for e in logs if e.get("code") == "GG101"]
    return {
        **result,
        "event_ranks": [(e.get("rank"), e.get("world_size")) for e in events],
    }


def run(rank: int, world: int, port: int, outdir: str, only: list[str]) -> None:
    """One rank: every scenario in order, on one process group."""
    run_scenarios(SCENARIOS, rank, world, port, outdir, only)


if __name__ == "__main__":
    spawn(run)
