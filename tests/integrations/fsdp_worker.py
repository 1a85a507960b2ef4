"""Two-process fully sharded scenarios (FSDP2 and FSDP1, gloo, loopback), run once per session.

``python fsdp_worker.py OUTDIR`` spawns 2 ranks; each runs every scenario in
order on one process group and writes ``OUTDIR/rank-{rank}.json`` with, per
scenario, the findings its guard reported. ``test_fsdp.py`` asserts on those
files. As in ``ddp_worker.py``, one pair of processes serves every scenario.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from typing import Any

import structlog
import torch
import two_ranks
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
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
KINDS = ("per_layer", "root")


def model(kind: str = "per_layer", extra: bool = False) -> nn.Module:
    """The same initial weights on every rank, sharded with FSDP2 (``fully_shard``).

    ``per_layer`` shards each layer and then the root, as FSDP2's examples do
    (one parameter group per layer); ``root`` shards the whole model as one group.
    """
    torch.manual_seed(0)
    net = Net(extra)
    if kind == "per_layer":
        fully_shard(net.encoder)
        fully_shard(net.head)
    fully_shard(net)
    return net


def fsdp1_model() -> nn.Module:
    """The same initial weights on every rank, wrapped by FSDP1 with its original parameters."""
    torch.manual_seed(0)
    return FullyShardedDataParallel(Net(), use_orig_params=True, device_id=torch.device("cpu"))


plain_loop = two_ranks.plain_loop


for _kind in KINDS:
    for _stn in (True, False):
        _suffix = f"{_kind}_{'none' if _stn else 'zeros'}"

        def _correct(rank: int, kind: str = _kind, stn: bool = _stn) -> Result:
            return plain_loop(rank, model(kind), set_to_none=stn)

        def _model_clear(rank: int, kind: str = _kind, stn: bool = _stn) -> Result:
            return plain_loop(rank, model(kind), set_to_none=stn, clear_model=True)

        def _cleared(rank: int, kind: str = _kind, stn: bool = _stn) -> Result:
            return plain_loop(rank, model(kind), set_to_none=stn, clear_after_backward_on=1)

        SCENARIOS[f"correct_{_suffix}"] = _correct
        SCENARIOS[f"correct_model_zero_grad_{_suffix}"] = _model_clear
        SCENARIOS[f"cleared_before_step_on_rank1_{_suffix}"] = _cleared

    def _missing(rank: int, kind: str = _kind) -> Result:
        return plain_loop(rank, model(kind), skip_zero_on=1)

    def _by_hand(rank: int, kind: str = _kind) -> Result:
        return plain_loop(rank, model(kind), clear_by_hand=True)

    def _clipped(rank: int, kind: str = _kind) -> Result:
        return plain_loop(rank, model(kind), clip=True)

    def _clipped_missing(rank: int, kind: str = _kind) -> Result:
        return plain_loop(rank, model(kind), clip=True, skip_zero_on=1)

    SCENARIOS[f"missing_zero_grad_on_rank1_{_kind}"] = _missing
    SCENARIOS[f"correct_clear_by_hand_{_kind}"] = _by_hand
    SCENARIOS[f"correct_clipped_{_kind}"] = _clipped
    SCENARIOS[f"clipped_missing_zero_grad_on_rank1_{_kind}"] = _clipped_missing


def accumulation_loop(
    rank: int,
    *,
    kind: str,
    set_to_none: bool = True,
    unsynced: bool,
    declare: bool = True,
    micro_batches: int = ACCUM,
    model_clear_inside_on: int | None = None,
) -> Result:
    """``micro_batches`` micro-batches per step, declared as ``ACCUM``.

    ``unsynced``: every micro-batch but the last runs under
    ``set_requires_gradient_sync(False)``, FSDP2's ``no_sync()``.
    """
    net = model(kind)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    kw: dict[str, Any] = {"accumulation_steps": ACCUM if declare else None}
    with guarded(opt, net, **kw) as g:
        for step in range(STEPS):
            opt.zero_grad(set_to_none=set_to_none)
            for k in range(micro_batches):
                last = k == micro_batches - 1
                if unsynced:
                    net.set_requires_gradient_sync(last)  # type: ignore[operator]
                if rank == model_clear_inside_on and k > 0:
                    # alpaca_farm: a model-level clear inside the window. (Between
                    # the forward and the backward an FSDP2 root holds its unsharded
                    # parameters, and a clear there reaches no gradient.)
                    net.zero_grad()
                loss_of(net, rank, step * micro_batches + k).backward()
            opt.step()
    return findings(g)


for _kind in KINDS:
    for _stn in (True, False):
        for _unsynced in (False, True):
            _name = f"accumulate_{'unsynced' if _unsynced else 'synced'}_{_kind}"
            _name += f"_{'none' if _stn else 'zeros'}"

            def _acc(rank: int, kind: str = _kind, stn: bool = _stn, u: bool = _unsynced) -> Result:
                return accumulation_loop(rank, kind=kind, set_to_none=stn, unsynced=u)

            SCENARIOS[_name] = _acc

    def _undeclared(rank: int, kind: str = _kind) -> Result:
        return accumulation_loop(rank, kind=kind, unsynced=True, declare=False)

    def _inside(rank: int, kind: str = _kind) -> Result:
        return accumulation_loop(rank, kind=kind, unsynced=False, model_clear_inside_on=1)

    def _inside_unsynced(rank: int, kind: str = _kind) -> Result:
        return accumulation_loop(rank, kind=kind, unsynced=True, model_clear_inside_on=1)

    def _too_long(rank: int, kind: str = _kind) -> Result:
        return accumulation_loop(rank, kind=kind, unsynced=True, micro_batches=ACCUM + 1)

    def _discarded(rank: int, kind: str = _kind) -> Result:
        return accumulation_loop(
            rank, kind=kind, unsynced=False, declare=False, model_clear_inside_on=1
        )

    SCENARIOS[f"accumulate_undeclared_{_kind}"] = _undeclared
    SCENARIOS[f"model_zero_grad_inside_window_on_rank1_{_kind}"] = _inside
    SCENARIOS[f"model_zero_grad_inside_unsynced_window_on_rank1_{_kind}"] = _inside_unsynced
    SCENARIOS[f"unsynced_window_too_long_{_kind}"] = _too_long
    SCENARIOS[f"undeclared_clear_inside_every_window_on_rank1_{_kind}"] = _discarded


@scenario
def step_in_validation_loop(rank: int) -> Result:
    """A step left in a no_grad validation loop: GG103 on every rank."""
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    with guarded(opt, net) as g:
        for i in range(STEPS):
            opt.zero_grad()
            loss_of(net, rank, i).backward()
            opt.step()
        opt.zero_grad()
        with torch.no_grad():
            for i in range(2):
                loss_of(net, rank, 100 + i)
                opt.step()
    return findings(g)


def numerics_loop(rank: int, steps: int, bad_step: int | None, poison: str) -> Result:
    """A correct loop whose ``bad_step`` (1-based) gets a NaN or a far too large target."""
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    with guarded(opt, net) as g:
        for i in range(steps):
            opt.zero_grad()
            scale = 1.0
            if i + 1 == bad_step:
                scale = float("nan") if poison == "nan" else 1e6
            loss_of(net, rank, i, scale).backward()
            opt.step()
    return findings(g)


@scenario
def nan_gradient(rank: int) -> Result:
    """A NaN target at step 3: GG201 on every rank, since the reduce-scatter spreads it."""
    return numerics_loop(rank, STEPS, 3, "nan")


@scenario
def exploding_gradient(rank: int) -> Result:
    """A target a million times too large at step 25, after the warm-up: GG202."""
    return numerics_loop(rank, 26, 25, "explode")


@scenario
def healthy_numerics(rank: int) -> Result:
    """The same 26 steps with nothing wrong: silent."""
    return numerics_loop(rank, 26, None, "explode")


@scenario
def unused_layer(rank: int) -> Result:
    """A layer in the optimizer that the forward never uses: GG301 after unused_after steps."""
    return plain_loop(rank, model(extra=True), unused_after=4)


@scenario
def every_layer_used(rank: int) -> Result:
    """The twin of unused_layer with every layer used: silent with the same unused_after."""
    return plain_loop(rank, model(), unused_after=4)


@scenario
def head_not_in_optimizer(rank: int) -> Result:
    """An optimizer over the encoder only, while the head trains too: GG302."""
    net = model()
    return plain_loop(rank, net, params=net.encoder.parameters(), clear_model=True)


def validation(net: nn.Module, rank: int, back_to_train: bool) -> Callable[[int], None]:
    """Before step 3, a validation pass in eval mode; ``back_to_train``: then ``train()``."""

    def before(i: int) -> None:
        if i == 2:
            net.eval()
            with torch.no_grad():
                loss_of(net, rank, 100)
            if back_to_train:
                net.train()

    return before


@scenario
def eval_mode_left_on(rank: int) -> Result:
    """Validation leaves the model in eval mode and training resumes: GG303."""
    net = model()
    return plain_loop(rank, net, before=validation(net, rank, back_to_train=False))


@scenario
def eval_mode_restored(rank: int) -> Result:
    """The twin of eval_mode_left_on that calls train() after validation: silent."""
    net = model()
    return plain_loop(rank, net, before=validation(net, rank, back_to_train=True))


@scenario
def rank_check_under_fsdp(rank: int) -> Result:
    """check_ranks_every=1 under FSDP2: skipped with one log line, no GG401, no hang."""
    with structlog.testing.capture_logs() as logs:
        result = plain_loop(rank, model(), check_ranks_every=1)
    return {**result, "events": [e["event"] for e in logs]}


@scenario
def norms_recorded_per_rank(rank: int) -> Result:
    """record_norms under FSDP2: every judged step's norms of this rank's shards, in its log."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "run.jsonl")
        gradguard.install(mode="log", log_json=path, record_norms=True)
        try:
            plain_loop(rank, model())  # its guard takes record_norms from install()
        finally:
            gradguard.uninstall()
        with open(path, encoding="utf-8") as f:
            norms = [r for r in map(json.loads, f) if r.get("event") == "norms"]
    return {
        "findings": [],
        "steps": [r["step"] for r in norms],
        "ranks": sorted({r["rank"] for r in norms}),
        "modules": sorted(norms[0]["modules"]),
        "finite": all(isinstance(r["total"], float) for r in norms),
    }


@scenario
def events_carry_rank(rank: int) -> Result:
    """A finding's structlog event carries rank and world_size."""
    with structlog.testing.capture_logs() as logs:
        result = plain_loop(rank, model(), skip_zero_on=rank)
    events = [e for e in logs if e.get("code") == "GG101"]
    return {**result, "event_ranks": [(e.get("rank"), e.get("world_size")) for e in events]}


def _train(net: nn.Module, opt: torch.optim.Optimizer, rank: int) -> None:
    for i in range(STEPS):
        opt.zero_grad()
        for k in range(2):
            net.set_requires_gradient_sync(k == 1)  # type: ignore[operator]
            loss_of(net, rank, 2 * i + k).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()


@scenario
def training_unchanged(rank: int) -> Result:
    """Guarded in strict mode and unguarded, AdamW on FSDP2 trains to the same bits."""
    shards = []
    for guard_it in (False, True):
        net = model()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
        with contextlib.ExitStack() as stack:
            if guard_it:
                stack.enter_context(guarded(opt, net, mode="strict"))
            _train(net, opt, rank)
        shards.append([p.to_local().clone() for p in net.parameters()])  # type: ignore[operator]
    same = all(torch.equal(a, b) for a, b in zip(*shards, strict=True))
    return {"findings": [], "identical": same}


# -- FSDP1: FullyShardedDataParallel(use_orig_params=True) ------------------------


for _stn in (True, False):
    _zeros = "none" if _stn else "zeros"

    def _fsdp1_correct(rank: int, stn: bool = _stn) -> Result:
        return plain_loop(rank, fsdp1_model(), set_to_none=stn)

    def _fsdp1_cleared(rank: int, stn: bool = _stn) -> Result:
        return plain_loop(rank, fsdp1_model(), set_to_none=stn, clear_after_backward_on=1)

    SCENARIOS[f"fsdp1_correct_{_zeros}"] = _fsdp1_correct
    SCENARIOS[f"fsdp1_cleared_before_step_on_rank1_{_zeros}"] = _fsdp1_cleared


@scenario
def fsdp1_correct_clear_by_hand(rank: int) -> Result:
    """FSDP1 with p.grad.zero_() before each backward, which no wrapper sees: silent."""
    return plain_loop(rank, fsdp1_model(), clear_by_hand=True)


@scenario
def fsdp1_correct_model_zero_grad(rank: int) -> Result:
    """FSDP1 cleared through the model rather than the optimizer: silent."""
    return plain_loop(rank, fsdp1_model(), clear_model=True)


@scenario
def fsdp1_missing_zero_grad_on_rank1(rank: int) -> Result:
    """FSDP1 with zero_grad forgotten on rank 1: GG101 on rank 1."""
    return plain_loop(rank, fsdp1_model(), skip_zero_on=1)


@scenario
def fsdp1_accumulate_no_sync(rank: int) -> Result:
    """FSDP1 accumulation under no_sync() but the last micro-batch, declared: silent."""
    net = fsdp1_model()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    with guarded(opt, net, accumulation_steps=ACCUM) as g:
        for step in range(STEPS):
            opt.zero_grad()
            for k in range(ACCUM):
                ctx = net.no_sync() if k < ACCUM - 1 else contextlib.nullcontext()
                with ctx:  # type: ignore[attr-defined]
                    loss_of(net, rank, step * ACCUM + k).backward()
            opt.step()
    return findings(g)


def run(rank: int, world: int, port: int, outdir: str, only: list[str]) -> None:
    """One rank: every scenario in order, on one process group."""
    run_scenarios(SCENARIOS, rank, world, port, outdir, only)


if __name__ == "__main__":
    spawn(run)
