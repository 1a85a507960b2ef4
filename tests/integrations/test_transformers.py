"""transformers Trainer on a tiny GPT-2 built from a config: no download, no finding."""

from __future__ import annotations

import pytest
import torch
from support import require
from test_cost import NORM_PASS_OPS, PROBE_OPS, overhead

import gradguard

transformers = require("transformers")
require("accelerate")  # the Trainer's own dependency


class Tokens(torch.utils.data.Dataset):
    """Fixed random token sequences, labels equal to inputs."""

    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


def trainer(tmp_path, *, accumulate: int, max_grad_norm: float = 1.0):
    """A Trainer over a 1-layer GPT-2 with a 64-token vocabulary, writing nothing but tmp_path."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=1, n_embd=32, n_head=2, n_positions=16, vocab_size=64, bos_token_id=0
    )
    config.eos_token_id = 0
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=accumulate,
        max_steps=4,
        max_grad_norm=max_grad_norm,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    model = transformers.GPT2LMHeadModel(config)
    return transformers.Trainer(model=model, args=args, train_dataset=Tokens())


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_short_training_run_is_silent_in_strict_mode(tmp_path, accumulate):
    """Trainer.train() with clipping, with and without accumulation: every step judged, none bad."""
    t = trainer(tmp_path, accumulate=accumulate)
    gradguard.install(mode="strict")
    try:
        t.train()
        g = gradguard.guard_of(t.optimizer)
        assert g is not None
        steps = g._judge.step
        declared = g.options.accumulation_steps
    finally:
        rows = gradguard.uninstall()
    assert rows == []
    assert steps == 4
    assert declared == (accumulate if accumulate > 1 else None)


def test_guarding_the_trainers_optimizer_directly_is_silent(tmp_path):
    """guard(trainer.optimizer) from a TrainerCallback: the window is found, every step judged."""

    class Guard(transformers.TrainerCallback):
        guard: gradguard.Guard | None = None

        def on_train_begin(self, args, state, control, optimizer=None, model=None, **kw):
            gradguard.guard(optimizer, model=model, mode="strict")
            Guard.guard = gradguard.guard_of(optimizer)

    t = trainer(tmp_path, accumulate=2)
    t.add_callback(Guard)
    t.train()
    g = Guard.guard
    assert g is not None
    try:
        assert g.findings == []
        assert g._judge.step == 4
        assert g.options.accumulation_steps == 2  # found through the Trainer on the call stack
    finally:
        gradguard.unguard(t.optimizer)


def test_a_guarded_trainer_step_adds_no_sync_and_a_clipped_loops_ops(device_results):
    """Under the Trainer, which clips, gradguard adds no host-device sync to a step and the
    ops of any clipped loop (two norm passes, the zero check reading the second), attached
    either way."""
    # With the zero check's answer still on the device at the next backward, that
    # backward reads the finite probe too (as in tests/test_cost.py).
    probe = PROBE_OPS if device_results != "eager" else 0
    workload = overhead.WORKLOADS["trainer"]
    variants = overhead.make_variants()
    torch.manual_seed(0)
    model = workload.model()
    counts = {}
    for name in ("plain", "warn", "install"):
        runner = overhead.TrainerRunner(workload, variants[name], torch.device("cpu"), model)
        try:
            counts[name] = runner.count(2)
            assert runner.findings() == ""
        finally:
            runner.detach()
    plain_ops, plain_syncs = counts["plain"]
    for name in ("warn", "install"):
        ops, syncs = counts[name]
        extra = 2 * NORM_PASS_OPS + probe
        assert (ops - plain_ops, syncs - plain_syncs) == (extra, 0)
