"""DistributedDataParallel on 2 gloo processes: correct loops silent, one-rank bugs on that rank.

Also GG401 rank-divergence on the no_sync bugs users shipped, and its silent twin.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from support import codes, require, run_worker, torchrun

HERE = Path(__file__).resolve().parent
ALL = ["encoder.weight", "encoder.bias", "head.weight", "head.bias"]
KINDS = ["copy", "bucket_view"]


@pytest.fixture(scope="session")
def ddp(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Every scenario of ``ddp_worker.py``, run once on 2 ranks: per rank, per scenario."""
    require("torch.distributed")
    return run_worker(HERE / "ddp_worker.py", tmp_path_factory.mktemp("ddp"))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("zeros", ["none", "zeros"])
@pytest.mark.parametrize("clear", ["optimizer", "model"])
def test_correct_loops_are_silent_on_every_rank(ddp, kind, zeros, clear):
    """zero_grad (optimizer or model, either set_to_none) then backward then step: silent."""
    middle = "model_zero_grad_" if clear == "model" else ""
    name = f"correct_{middle}{kind}_{zeros}"
    assert [codes(r[name]) for r in ddp] == [[], []]


@pytest.mark.parametrize("kind", KINDS)
def test_clearing_by_hand_that_no_wrapper_sees_is_silent(ddp, kind):
    """p.grad.zero_() on every gradient, even views sharing one bucket's counter: silent."""
    assert [codes(r[f"correct_clear_by_hand_{kind}"]) for r in ddp] == [[], []]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("zeros", ["none", "zeros"])
@pytest.mark.parametrize("policy", ["none", "all_but_last"])
def test_declared_accumulation_is_silent_with_and_without_no_sync(ddp, kind, zeros, policy):
    """3 micro-batches per step, synced every time or under no_sync but the last: silent."""
    name = f"accumulate_sync_{policy}_{kind}_{zeros}"
    assert [codes(r[name]) for r in ddp] == [[], []]


@pytest.mark.parametrize("kind", KINDS)
def test_undeclared_no_sync_accumulation_is_silent(ddp, kind):
    """Accumulation under no_sync without accumulation_steps is not GG105."""
    assert [codes(r[f"accumulate_undeclared_{kind}"]) for r in ddp] == [[], []]


@pytest.mark.parametrize("kind", KINDS)
def test_missing_zero_grad_on_one_rank_is_reported_by_that_rank_only(ddp, kind):
    """Rank 1 never clears: GG101 on rank 1 naming every parameter, nothing on rank 0.

    With bucket views DDP copies each gradient into a new bucket view at its
    second iteration, so the first stale step there is step 3.
    """
    rank0, rank1 = (r[f"missing_zero_grad_on_rank1_{kind}"] for r in ddp)
    assert codes(rank0) == []
    assert codes(rank1) == ["GG101"]
    assert rank1["findings"][0]["params"] == ALL
    assert rank1["findings"][0]["step"] == (2 if kind == "copy" else 3)


@pytest.mark.parametrize("kind", KINDS)
def test_clear_between_backward_and_step_on_one_rank_is_reported_by_that_rank(ddp, kind):
    """Rank 1 clears between backward and step: GG102 at step 1 on rank 1 only."""
    rank0, rank1 = (r[f"cleared_before_step_on_rank1_{kind}"] for r in ddp)
    assert codes(rank0) == []
    assert codes(rank1) == ["GG102"]
    assert rank1["findings"][0]["step"] == 1


@pytest.mark.parametrize("kind", KINDS)
def test_model_zero_grad_inside_a_no_sync_window_is_reported_by_that_rank(ddp, kind):
    """A model-level clear inside a declared window on rank 1: GG104 on rank 1 only."""
    rank0, rank1 = (r[f"model_zero_grad_inside_window_on_rank1_{kind}"] for r in ddp)
    assert codes(rank0) == []
    assert codes(rank1) == ["GG104"]
    assert "threw micro-batches away" in rank1["findings"][0]["message"]


def test_zero_redundancy_optimizer_is_silent(ddp):
    """ZeroRedundancyOptimizer over DDP, stepping its shard on each rank: silent."""
    assert [codes(r["zero_redundancy_correct"]) for r in ddp] == [[], []]


def test_zero_redundancy_optimizer_missing_zero_grad_on_one_rank(ddp):
    """ZeroRedundancyOptimizer without zero_grad on rank 1: GG101 on rank 1 only."""
    rank0, rank1 = (r["zero_redundancy_missing_zero_grad_on_rank1"] for r in ddp)
    assert codes(rank0) == []
    assert codes(rank1) == ["GG101"]
    assert rank1["findings"][0]["params"] == ALL


def test_find_unused_parameters_with_a_branch_used_every_other_step_is_silent(ddp):
    """find_unused_parameters=True with bucket views and a sometimes-unused layer: silent."""
    assert [codes(r["find_unused_parameters_correct"]) for r in ddp] == [[], []]


def test_log_events_carry_rank_and_world_size(ddp):
    """Each rank's structlog event for a finding names its rank and the world size."""
    assert [r["events_carry_rank"]["event_ranks"] for r in ddp] == [[[0, 2]], [[1, 2]]]


def test_messages_name_the_workers_line(ddp):
    """A finding's location is the worker's own step line, not torch's DDP code."""
    (finding,) = ddp[1]["missing_zero_grad_on_rank1_copy"]["findings"]
    assert "two_ranks.py:" in finding["message"]  # the shared loop's step line


# -- GG401 rank-divergence ------------------------------------------------------


def test_correct_no_sync_accumulation_checked_every_step_is_silent(ddp):
    """no_sync on all micro-batches but the last, compared on every step: silent."""
    assert [codes(r["ranks_correct_no_sync"]) for r in ddp] == [[], []]


def test_funasr_off_by_one_no_sync_window_is_reported_on_both_ranks(ddp):
    """FunASR's ``i % accum != 0`` under no_sync leaves the stepping micro-batch unsynced."""
    for result in (r["ranks_off_by_one_no_sync"] for r in ddp):
        assert codes(result) == ["GG401"]
        (finding,) = result["findings"]
        assert finding["step"] == 2  # check_ranks_every=2: the first check
        assert sorted(finding["params"]) == sorted(ALL)
        assert "rank 1 differs from rank 0" in finding["message"]
        assert "largest gap in gradient norm" in finding["message"]


def test_sync_flag_set_after_the_forward_is_reported(ddp):
    """nanoGPT's require_backward_grad_sync toggled around backward only: GG401 at step 3."""
    for result in (r["ranks_sync_flag_around_backward"] for r in ddp):
        assert codes(result) == ["GG401"]
        assert result["findings"][0]["step"] == 3


def test_strict_mode_raises_on_every_rank_before_the_update(ddp):
    """In strict mode both ranks raise RankDivergenceError at the first divergent step."""
    assert [r["ranks_off_by_one_strict"] for r in ddp] == [{"raised": "GG401", "step": 1}] * 2


# -- gradguard run under torchrun ------------------------------------------------

TORCHRUN_SCRIPT = """\
import os
import torch
import torch.distributed as dist
from torch import nn

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for i in range(4):
    if rank == 0:  # rank 1 never clears
        opt.zero_grad()
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(10 * rank + i))
    model(x).pow(2).mean().backward()
    opt.step()
dist.barrier()
dist.destroy_process_group()
print(f"rank {rank} done")
"""


def _rank_one_log(source: str, tmp_path, env: dict[str, str]) -> list[str]:
    """Run ``source`` on two ranks under ``torchrun -m gradguard run --mode=log`` with a log
    per rank; both ranks finish and rank 0's log stays empty: rank 1's log lines."""
    script = tmp_path / "train.py"
    script.write_text(source)
    log = f"--log-json={tmp_path / 'run-{rank}.jsonl'}"
    proc = torchrun("-m", "gradguard", "run", "--mode=log", log, str(script), env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Both ranks share the launcher's stdout, so their lines may interleave.
    assert "rank 0 done" in proc.stdout
    assert "rank 1 done" in proc.stdout
    assert (tmp_path / "run-0.jsonl").read_text() == ""
    return (tmp_path / "run-1.jsonl").read_text().splitlines()


def test_runner_under_torchrun_writes_one_log_per_rank_and_only_the_buggy_rank_reports(
    tmp_path, subprocess_env
):
    """torchrun -m gradguard run --log-json run-{rank}.jsonl: rank 1's bug is in run-1 only."""
    lines = _rank_one_log(TORCHRUN_SCRIPT, tmp_path, subprocess_env)
    # Finding records carry a code; the closing "summary" record counts them.
    records = [r for r in map(json.loads, lines) if r.get("event") not in ("summary", "norms")]
    assert [(r["code"], r["rank"], r["world_size"]) for r in records] == [("GG101", 1, 2)]
    assert records[0]["params"] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert records[0]["location"] == "train.py:16"


# Each rank starts a trainer process of its own; rank 1's forgets zero_grad.
RANK_CHILD_SCRIPT = """\
import os

import torch
import torch.multiprocessing as mp
from torch import nn


def train(clear):
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        if clear:
            opt.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()


if __name__ == "__main__":
    rank = int(os.environ["RANK"])
    child = mp.get_context("fork").Process(target=train, args=(rank == 0,))
    child.start()
    child.join()
    print(f"rank {rank} done")
"""


def test_under_torchrun_each_ranks_children_report_to_that_ranks_log(tmp_path, subprocess_env):
    """A child of rank 1 with a bug is in run-1.jsonl, with the child's pid; run-0 stays empty."""
    lines = _rank_one_log(RANK_CHILD_SCRIPT, tmp_path, subprocess_env)
    finding, summary = map(json.loads, lines)
    assert (finding["code"], finding["step"], finding["params"]) == ("GG101", 2, ["weight", "bias"])
    assert finding["location"] == "train.py:16"
    assert finding["pid"] != summary["pid"]  # the child's own, not its rank's
    assert summary["counts"] == {"GG101": 2}


# FunASR's off-by-one no_sync window, with no gradguard line in it: the first
# micro-batch of each window syncs and the last, which steps, does not, so the
# ranks step on different gradients. Windows of 3 micro-batches.
OFF_BY_ONE_SCRIPT = """\
import contextlib

import torch
import torch.distributed as dist
from torch import nn

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for step in range(4):
    opt.zero_grad()
    for k in range(3):
        with model.no_sync() if k % 3 != 0 else contextlib.nullcontext():
            seed = torch.Generator().manual_seed(100 * rank + 3 * step + k)
            x = torch.randn(8, 4, generator=seed)
            model(x).pow(2).mean().backward()
    opt.step()
dist.barrier()
dist.destroy_process_group()
print(f"rank {rank} done")
"""


def test_runner_under_torchrun_compares_ranks_and_reads_the_projects_table(
    tmp_path, subprocess_env
):
    """torchrun -m gradguard run --check-ranks-every 1, in a project whose [tool.gradguard]
    declares 2 micro-batches: each rank reports GG401 (only comparing ranks finds the
    off-by-one no_sync window) and GG104 (the loop steps every 3)."""
    (tmp_path / "pyproject.toml").write_text("[tool.gradguard]\naccumulation_steps = 2\n")
    script = tmp_path / "train.py"
    script.write_text(OFF_BY_ONE_SCRIPT)
    log = f"--log-json={tmp_path / 'run-{rank}.jsonl'}"
    args = ["-m", "gradguard", "run", "--mode=log", "--check-ranks-every", "1", log, str(script)]
    proc = torchrun(*args, env=subprocess_env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):
        lines = (tmp_path / f"run-{rank}.jsonl").read_text().splitlines()
        records = [r for r in map(json.loads, lines) if r.get("event") not in ("summary", "norms")]
        assert {r["code"] for r in records} == {"GG104", "GG401"}, (rank, records)
        assert {r["rank"] for r in records} == {rank}
