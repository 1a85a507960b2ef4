"""transformers Trainer on a tiny GPT-2 built from a config: no download.

Under `gradguard.install`, `guard` from a callback of the user's and gradguard's
own `GradGuardCallback`: silent and unchanged when correct, the bug named when not.
"""

from __future__ import annotations

import pytest
import torch
from support import require
from test_cost import NORM_PASS_OPS, PROBE_OPS, overhead
from torch import nn
from torch.optim.optimizer import _global_optimizer_pre_hooks

import gradguard
from gradguard._health import LATENESS

transformers = require("transformers")
require("accelerate")  # the Trainer's own dependency
from gradguard.transformers import GradGuardCallback  # noqa: E402  (needs transformers)


class Tokens(torch.utils.data.Dataset):
    """Fixed random token sequences, labels equal to inputs."""

    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


def trainer(
    tmp_path,
    *,
    accumulate: int,
    max_grad_norm: float = 1.0,
    callbacks=(),
    kind=transformers.Trainer,
    logging: bool = False,
    unused_head: bool = False,
):
    """A Trainer over a 1-layer GPT-2 with a 64-token vocabulary, writing nothing but tmp_path.

    ``logging`` logs every step (to the log history and stdout); ``unused_head``
    adds a layer the loss never uses.
    """
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
        logging_strategy="steps" if logging else "no",
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    model = transformers.GPT2LMHeadModel(config)
    if unused_head:
        model.unused_head = nn.Linear(32, 2)
    return kind(model=model, args=args, train_dataset=Tokens(), callbacks=list(callbacks))


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


# -- gradguard.transformers.GradGuardCallback ----------------------------------------


class ClearsAfterBackward(transformers.Trainer):
    """A training_step that frees the gradients as soon as backward has made them."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.optimizer.zero_grad()
        return loss


BACKWARD_LINE = ClearsAfterBackward.training_step.__code__.co_firstlineno + 1
CLEAR_LINE = BACKWARD_LINE + 1


class Recorder(transformers.TrainerCallback):
    """What a reporting integration sees: a copy of each of the Trainer's logs."""

    def __init__(self) -> None:
        self.logs: list[dict[str, float]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def step_logs(history: list[dict[str, float]]) -> list[dict[str, float]]:
    """The per-step entries of a log history, without the end-of-training summary."""
    return [entry for entry in history if "loss" in entry]


def gradguard_keys(history: list[dict[str, float]]) -> list[dict[str, float]]:
    """Per entry, the keys GradGuardCallback added."""
    return [{k: v for k, v in e.items() if k.startswith("gradguard/")} for e in history]


def assert_unhooked(t: transformers.Trainer) -> None:
    """The Trainer's optimizer and model are as they were before the callback attached."""
    opt = t.optimizer.optimizer  # inside the AcceleratedOptimizer
    assert isinstance(opt, torch.optim.AdamW)
    assert gradguard.guard_of(opt) is None
    assert not opt._optimizer_step_pre_hooks
    assert not opt._optimizer_step_post_hooks
    assert "zero_grad" not in opt.__dict__
    assert "add_param_group" not in opt.__dict__
    assert not any(p._post_accumulate_grad_hooks for p in t.model.parameters())
    assert not _global_optimizer_pre_hooks  # the model checks' hook


@pytest.mark.parametrize("accumulate", [1, 2])
def test_the_callback_is_silent_and_changes_no_parameter(tmp_path, accumulate):
    """A correct run with the callback in strict mode: judged from step 1, the window taken
    from the Trainer, nothing logged, every parameter bit-identical to the run without it."""
    callback = GradGuardCallback(mode="strict")
    guarded = trainer(tmp_path, accumulate=accumulate, callbacks=[callback], logging=True)
    guarded.train()
    plain = trainer(tmp_path, accumulate=accumulate, logging=True)
    plain.train()
    assert callback.findings == []
    (g,) = callback.guards
    assert g.closed
    assert g._judge.step == 4
    assert g.options.accumulation_steps == (accumulate if accumulate > 1 else None)
    assert len(step_logs(guarded.state.log_history)) == 4
    assert gradguard_keys(guarded.state.log_history) == [{}] * 5
    assert_unhooked(guarded)
    mine, theirs = guarded.model.state_dict(), plain.model.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert step_logs(guarded.state.log_history) == step_logs(plain.state.log_history)


def test_clearing_between_backward_and_step_is_named_and_counted_in_the_logs(tmp_path):
    """zero_grad() after the Trainer's backward: GG102 at step 1 with the model's names and
    the lines involved, and each log says how often it fired so far."""
    callback = GradGuardCallback(mode="log")
    t = trainer(
        tmp_path, accumulate=1, kind=ClearsAfterBackward, callbacks=[callback], logging=True
    )
    t.train()
    (finding,) = callback.findings
    assert finding.code == "GG102"
    assert finding.step == 1
    assert sorted(finding.params) == sorted(n for n, p in t.model.named_parameters())
    assert finding.written_at.endswith(f"test_transformers.py:{BACKWARD_LINE}")
    assert finding.cleared_at.endswith(f"test_transformers.py:{CLEAR_LINE}")
    assert callback.counts() == {"GG102": 4}
    steps = [{"gradguard/GG102": n} for n in (1, 2, 3, 4)]
    assert gradguard_keys(t.state.log_history) == [*steps, {"gradguard/GG102": 4}]
    assert_unhooked(t)


def test_strict_mode_stops_train_at_the_first_step_and_close_removes_the_hooks(tmp_path):
    """A strict finding ends train() with its error at step 1; the Trainer calls no callback
    after an error, and close() takes the hooks off."""
    callback = GradGuardCallback(mode="strict")
    t = trainer(tmp_path, accumulate=1, kind=ClearsAfterBackward, callbacks=[callback])
    with pytest.raises(gradguard.ClearedBeforeStepError) as info:
        t.train()
    assert info.value.finding.step == 1
    assert gradguard.guard_of(t.optimizer) is not None
    callback.close()
    callback.close()  # idempotent
    assert_unhooked(t)


def test_a_layer_the_loss_never_uses_reaches_every_callbacks_logs(tmp_path):
    """A head left out of the loss: GG301 naming it, with the callback's own unused_after;
    a callback given before gradguard's, as the reporting integrations are, sees the count."""
    recorder = Recorder()
    callback = GradGuardCallback(mode="log", unused_after=2)
    t = trainer(
        tmp_path, accumulate=2, callbacks=[recorder, callback], logging=True, unused_head=True
    )
    t.train()
    assert [f.code for f in callback.findings] == ["GG301"]
    assert callback.findings[0].params == ("unused_head.weight", "unused_head.bias")
    assert callback.findings[0].step == 2
    seen = gradguard_keys(recorder.logs)
    assert [sorted(e) for e in seen] == [[], *[["gradguard/GG301"]] * 4]  # found at step 2
    assert seen[-1] == {"gradguard/GG301": callback.counts()["GG301"]}
    assert gradguard_keys(t.state.log_history) == seen
    assert t.callback_handler.callbacks[0] is callback


def test_a_log_counts_results_still_on_the_device(tmp_path, monkeypatch):
    """With the numeric checks' results not yet read back, each log still counts its step's
    non-finite gradients (GG201): the callback judges what is pending before it counts."""
    monkeypatch.setattr(LATENESS, "steps", 3)  # ready 3 looks later, as on a busy GPU
    callback = GradGuardCallback(mode="log")
    t = trainer(tmp_path, accumulate=1, callbacks=[callback], logging=True)
    with torch.no_grad():
        t.model.transformer.ln_f.weight[0] = float("nan")  # a corrupted checkpoint
    t.train()
    assert [f.code for f in callback.findings] == ["GG201"]
    counts = [e.get("gradguard/GG201") for e in step_logs(t.state.log_history)]
    assert counts == [1, 2, 3, 4]


@pytest.mark.parametrize("mode", ["warn", "log", "strict"])
def test_an_optimizer_it_cannot_hook_stops_training_only_in_strict_mode(tmp_path, capsys, mode):
    """Handed an optimizer that is no torch optimizer (as DeepSpeed's), the callback says so
    and lets training go on in warn and log mode; strict mode raises the TypeError."""
    callback = GradGuardCallback(mode=mode)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    state, control = transformers.TrainerState(), transformers.TrainerControl()
    begin = {"optimizer": object(), "model": nn.Linear(2, 1)}
    if mode == "strict":
        with pytest.raises(TypeError, match=r"needs a torch\.optim\.Optimizer; got object"):
            callback.on_train_begin(args, state, control, **begin)
    else:
        callback.on_train_begin(args, state, control, **begin)
        assert "optimizer-not-guarded" in capsys.readouterr().err
    logs = {"loss": 1.0}
    callback.on_log(args, state, control, logs=logs)
    callback.on_train_end(args, state, control)
    assert callback.guards == []
    assert logs == {"loss": 1.0}
