"""FSDP2 (``fully_shard``) and FSDP1 on 2 gloo processes: correct loops silent, bugs reported.

Every scenario runs once, in one pair of processes (``fsdp_worker.py``); the
runner under torchrun is tested with a correct script and its buggy twin.
"""

from __future__ import annotations

from pathlib import Path
from subprocess import CompletedProcess
from typing import Any

import pytest
from support import codes, require, run_worker, torchrun

HERE = Path(__file__).resolve().parent
ALL = ["encoder.weight", "encoder.bias", "head.weight", "head.bias"]
KINDS = ["per_layer", "root"]


@pytest.fixture(scope="session")
def fsdp(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Every scenario of ``fsdp_worker.py``, run once on 2 ranks: per rank, per scenario."""
    require("torch.distributed.fsdp")
    return run_worker(HERE / "fsdp_worker.py", tmp_path_factory.mktemp("fsdp"))


def on_rank1_only(fsdp: list[dict[str, Any]], name: str, code: str) -> dict[str, Any]:
    """Assert rank 0 is silent and rank 1 reports ``code`` alone; rank 1's finding."""
    rank0, rank1 = (r[name] for r in fsdp)
    assert codes(rank0) == []
    assert codes(rank1) == [code]
    finding: dict[str, Any] = rank1["findings"][0]
    return finding


def on_every_rank(fsdp: list[dict[str, Any]], name: str, code: str) -> list[dict[str, Any]]:
    """Assert each rank reports ``code`` alone; each rank's finding."""
    assert [codes(r[name]) for r in fsdp] == [[code], [code]]
    return [r[name]["findings"][0] for r in fsdp]


# -- FSDP2: GG101-GG105 -----------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("zeros", ["none", "zeros"])
@pytest.mark.parametrize("clear", ["optimizer", "model"])
def test_correct_loops_are_silent_on_every_rank(fsdp, kind, zeros, clear):
    """zero_grad (optimizer or model, either set_to_none) then backward then step: silent."""
    middle = "model_zero_grad_" if clear == "model" else ""
    assert [codes(r[f"correct_{middle}{kind}_{zeros}"]) for r in fsdp] == [[], []]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("loop", ["clear_by_hand", "clipped"])
def test_clearing_by_hand_and_clipping_are_silent(fsdp, kind, loop):
    """p.grad.zero_() that no wrapper sees, or clip_grad_norm_ before each step: silent."""
    assert [codes(r[f"correct_{loop}_{kind}"]) for r in fsdp] == [[], []]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("clipped", [False, True])
def test_missing_zero_grad_on_one_rank_is_reported_by_that_rank_only(fsdp, kind, clipped):
    """Rank 1 never clears (clipping or not): GG101 at step 2 on rank 1, naming every parameter."""
    name = f"{'clipped_' if clipped else ''}missing_zero_grad_on_rank1_{kind}"
    finding = on_rank1_only(fsdp, name, "GG101")
    assert finding["params"] == ALL
    assert finding["step"] == 2


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("zeros", ["none", "zeros"])
def test_clear_between_backward_and_step_on_one_rank_is_reported_by_that_rank(fsdp, kind, zeros):
    """Rank 1 clears between backward and step (either set_to_none): GG102 at step 1 there."""
    finding = on_rank1_only(fsdp, f"cleared_before_step_on_rank1_{kind}_{zeros}", "GG102")
    assert finding["params"] == ALL
    assert finding["step"] == 1


def test_step_left_in_a_validation_loop_is_reported(fsdp):
    """A step inside a no_grad validation loop, after a clear: GG103 on every rank."""
    for finding in on_every_rank(fsdp, "step_in_validation_loop", "GG103"):
        assert finding["step"] == 7


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("zeros", ["none", "zeros"])
@pytest.mark.parametrize("sync", ["synced", "unsynced"])
def test_declared_accumulation_is_silent_synced_or_not(fsdp, kind, zeros, sync):
    """3 micro-batches per step, each synced or under set_requires_gradient_sync(False)
    but the last: silent with accumulation_steps=3."""
    assert [codes(r[f"accumulate_{sync}_{kind}_{zeros}"]) for r in fsdp] == [[], []]


@pytest.mark.parametrize("kind", KINDS)
def test_undeclared_unsynced_accumulation_is_silent(fsdp, kind):
    """Accumulation without gradient sync but on the last micro-batch, undeclared: not GG105."""
    assert [codes(r[f"accumulate_undeclared_{kind}"]) for r in fsdp] == [[], []]


@pytest.mark.parametrize("kind", KINDS)
def test_model_zero_grad_inside_a_window_is_reported_by_that_rank(fsdp, kind):
    """A model-level clear inside a declared, synced window on rank 1: GG104 there."""
    finding = on_rank1_only(fsdp, f"model_zero_grad_inside_window_on_rank1_{kind}", "GG104")
    assert "threw micro-batches away" in finding["message"]


@pytest.mark.parametrize("kind", KINDS)
def test_undeclared_clears_inside_every_window_are_reported_by_that_rank(fsdp, kind):
    """Without a declaration, rank 1 clears before each micro-batch but the first: GG105 at
    the third such step there."""
    name = f"undeclared_clear_inside_every_window_on_rank1_{kind}"
    finding = on_rank1_only(fsdp, name, "GG105")
    assert finding["step"] == 3
    assert finding["params"] == ALL


@pytest.mark.parametrize("kind", KINDS)
def test_a_clear_inside_an_unsynced_window_throws_nothing_away(fsdp, kind):
    """Unsynced, FSDP2 keeps the window in its unsharded gradients: a clear reaches none of it."""
    name = f"model_zero_grad_inside_unsynced_window_on_rank1_{kind}"
    assert [codes(r[name]) for r in fsdp] == [[], []]


@pytest.mark.parametrize("kind", KINDS)
def test_unsynced_window_longer_than_declared_is_reported(fsdp, kind):
    """4 micro-batches, 3 of them unsynced, with accumulation_steps=3: GG104 from the
    second window (the first runs before FSDP2 has made its unsharded parameters)."""
    for finding in on_every_rank(fsdp, f"unsynced_window_too_long_{kind}", "GG104"):
        assert finding["step"] == 2
        assert "step after 4 micro-batches" in finding["message"]


# -- FSDP2: GG201, GG202, GG301-GG303, GG401 ---------------------------------------


def test_nan_gradient_is_reported_on_every_rank(fsdp):
    """A NaN target at step 3: each rank finds NaN in its shards (GG201), naming them."""
    for finding in on_every_rank(fsdp, "nan_gradient", "GG201"):
        assert finding["step"] == 3
        assert finding["params"] == ALL


def test_exploding_gradient_is_reported_by_each_rank_from_its_shards(fsdp):
    """A target a million times too large at step 25: GG202 on each rank, naming the head."""
    for finding in on_every_rank(fsdp, "exploding_gradient", "GG202"):
        assert finding["step"] == 25
        assert set(finding["params"]) <= {"head.weight", "head.bias"}
    assert [codes(r["healthy_numerics"]) for r in fsdp] == [[], []]


def test_unused_layer_is_reported_and_its_twin_is_silent(fsdp):
    """A layer the forward never uses: GG301 after unused_after=4 steps; all layers used: silent."""
    for finding in on_every_rank(fsdp, "unused_layer", "GG301"):
        assert finding["params"] == ["extra.weight", "extra.bias"]
    assert [codes(r["every_layer_used"]) for r in fsdp] == [[], []]


def test_layer_no_optimizer_holds_is_reported(fsdp):
    """An optimizer over the encoder while the head trains too: GG302 naming the head."""
    for finding in on_every_rank(fsdp, "head_not_in_optimizer", "GG302"):
        assert finding["params"] == ["head.weight", "head.bias"]


def test_step_in_eval_mode_is_reported_and_its_twin_is_silent(fsdp):
    """Training resumes with the model left in eval mode: GG303; train() called: silent."""
    for finding in on_every_rank(fsdp, "eval_mode_left_on", "GG303"):
        assert finding["step"] == 3
        assert finding["params"] == ALL
    assert [codes(r["eval_mode_restored"]) for r in fsdp] == [[], []]


def test_rank_check_is_skipped_under_fsdp_with_a_log_line(fsdp):
    """check_ranks_every=1 on sharded parameters: no GG401, no hang, one rank-check-skipped."""
    for result in (r["rank_check_under_fsdp"] for r in fsdp):
        assert codes(result) == []
        assert result["events"] == ["rank-check-skipped"]


def test_record_norms_writes_each_ranks_shard_norms(fsdp):
    """install(record_norms=True) under FSDP2: a finite norms record per judged step and module."""
    for rank, result in enumerate(r["norms_recorded_per_rank"] for r in fsdp):
        assert result["steps"] == [1, 2, 3, 4, 5, 6]
        assert result["ranks"] == [rank]
        assert result["modules"] == ["encoder", "head"]
        assert result["finite"]


def test_log_events_carry_rank_and_world_size(fsdp):
    """Each rank's structlog event for a finding names its rank and the world size."""
    assert [r["events_carry_rank"]["event_ranks"] for r in fsdp] == [[[0, 2]], [[1, 2]]]


def test_training_is_bit_identical_guarded_and_unguarded(fsdp):
    """AdamW on FSDP2, unsynced accumulation and clipping: the same shards, guarded or not."""
    assert [r["training_unchanged"]["identical"] for r in fsdp] == [True, True]


# -- FSDP1: FullyShardedDataParallel(use_orig_params=True) -------------------------


@pytest.mark.parametrize(
    "name",
    [
        "fsdp1_correct_none",
        "fsdp1_correct_zeros",
        "fsdp1_correct_clear_by_hand",
        "fsdp1_correct_model_zero_grad",
        "fsdp1_accumulate_no_sync",
    ],
)
def test_fsdp1_correct_loops_are_silent(fsdp, name):
    """FSDP1: clears of every kind, and accumulation under no_sync(): silent on every rank."""
    assert [codes(r[name]) for r in fsdp] == [[], []]


def test_fsdp1_missing_zero_grad_is_reported_by_that_rank(fsdp):
    """FSDP1 with zero_grad forgotten on rank 1: GG101 at step 2, names without FSDP's prefix."""
    finding = on_rank1_only(fsdp, "fsdp1_missing_zero_grad_on_rank1", "GG101")
    assert finding["params"] == ALL
    assert finding["step"] == 2


@pytest.mark.parametrize("zeros", ["none", "zeros"])
def test_fsdp1_clear_between_backward_and_step_is_reported(fsdp, zeros):
    """FSDP1, rank 1 clears between backward and step: GG102 at step 1 on rank 1."""
    finding = on_rank1_only(fsdp, f"fsdp1_cleared_before_step_on_rank1_{zeros}", "GG102")
    assert finding["step"] == 1


# -- gradguard run --mode strict under torchrun ------------------------------------

TORCHRUN_SCRIPT = """\
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
for layer in (model[0], model[2]):
    fully_shard(layer)
fully_shard(model)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
for i in range(4):
    if {clears}:
        opt.zero_grad()
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(10 * rank + i))
    model(x).pow(2).mean().backward()
    opt.step()
dist.barrier()
dist.destroy_process_group()
print(f"rank {{rank}} done")
"""


def run_strict(tmp_path: Path, env: dict[str, str], clears: str) -> CompletedProcess[str]:
    """``torchrun -m gradguard run --mode strict train.py``, clearing when ``clears`` holds."""
    script = tmp_path / "train.py"
    script.write_text(TORCHRUN_SCRIPT.format(clears=clears))
    return torchrun("-m", "gradguard", "run", "--mode=strict", str(script), env=env, cwd=tmp_path)


def test_runner_in_strict_mode_under_torchrun_is_silent_on_a_correct_fsdp2_script(
    tmp_path, subprocess_env
):
    """torchrun -m gradguard run --mode strict on a correct FSDP2 loop: exit 0, nothing said."""
    proc = run_strict(tmp_path, subprocess_env, clears="True")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "rank 0 done" in proc.stdout
    assert "rank 1 done" in proc.stdout
    assert "GG" not in proc.stderr


def test_runner_in_strict_mode_under_torchrun_stops_the_buggy_fsdp2_script(
    tmp_path, subprocess_env
):
    """The twin that never clears on rank 1: GG101 raised at step 2 there, non-zero exit."""
    proc = run_strict(tmp_path, subprocess_env, clears="rank == 0")
    assert proc.returncode != 0
    assert "rank 1 done" not in proc.stdout
    assert "StaleGradientError" in proc.stderr
    assert "GG101 stale-gradient" in proc.stderr
    assert "at step 2 of AdamW#0 (train.py:19), params [0.weight, 0.bias, 2.weight, 2.bias]" in (
        proc.stderr
    )
