"""gradguard never changes training, never keeps tensors alive, and leaves nothing behind."""

from __future__ import annotations

import copy
import gc
import io
import pickle
import sys
import types
import weakref

import pytest
import torch
from conftest import Net, batches, loss_of

import gradguard


def train(guard_mode: str | None, *, buggy: bool, opt_name: str = "adamw") -> list[torch.Tensor]:
    """Train a fresh seeded Net for a few steps and return its final parameters."""
    torch.manual_seed(0)
    net = Net()
    if opt_name == "adamw":
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    else:
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    if guard_mode is not None:
        gradguard.guard(opt, model=net, mode=guard_mode)
    for i, b in enumerate(batches(8)):
        if not buggy or i % 3 == 0:  # the bug: zero_grad only every third step
            opt.zero_grad()
        loss_of(net, b).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
    if guard_mode is not None:
        gradguard.unguard(opt)
    return [p.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize("opt_name", ["adamw", "sgd"])
@pytest.mark.parametrize(
    ("mode", "buggy"), [("warn", True), ("log", True), ("strict", False), ("log", False)]
)
def test_guarded_training_is_bit_identical(mode, buggy, opt_name):
    """Parameters after guarded training equal unguarded ones bit for bit."""
    plain = train(None, buggy=buggy, opt_name=opt_name)
    if mode == "warn":
        with pytest.warns(gradguard.StaleGradientWarning):
            guarded = train(mode, buggy=buggy, opt_name=opt_name)
    else:
        guarded = train(mode, buggy=buggy, opt_name=opt_name)
    assert all(torch.equal(a, b) for a, b in zip(plain, guarded, strict=True))


def test_hooks_and_wrappers_are_gone_after_the_context_exits(net):
    """Every post-accumulate hook, step hook and zero_grad wrapper is removed on exit."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with gradguard.guarding(opt, model=net):
        assert all(p._post_accumulate_grad_hooks for p in net.parameters())
        assert opt._optimizer_step_pre_hooks
        assert opt._optimizer_step_post_hooks
        assert "zero_grad" in opt.__dict__
        opt.zero_grad()
        loss_of(net, batches(1)[0]).backward()
        opt.step()
    assert not any(p._post_accumulate_grad_hooks for p in net.parameters())
    assert not opt._optimizer_step_pre_hooks
    assert not opt._optimizer_step_post_hooks
    assert "zero_grad" not in opt.__dict__
    assert gradguard.guard_of(opt) is None


def test_hooks_are_removed_even_when_the_loop_raises(net):
    """An exception inside the with-block still removes every hook."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1)

    def buggy_step() -> None:
        loss_of(net, batches(1)[0]).backward()
        opt.zero_grad()
        opt.step()

    with pytest.raises(gradguard.ClearedBeforeStepError), gradguard.guarding(opt, mode="strict"):
        buggy_step()
    assert not any(p._post_accumulate_grad_hooks for p in net.parameters())
    assert not opt._optimizer_step_pre_hooks
    assert "zero_grad" not in opt.__dict__


def test_unguard_removes_hooks_and_returns_the_findings(net):
    """``unguard`` removes the hooks and hands back the guard with its findings."""
    opt = gradguard.guard(torch.optim.SGD(net.parameters(), lr=0.1), mode="log")
    loss_of(net, batches(1)[0]).backward()
    opt.zero_grad()
    opt.step()
    g = gradguard.unguard(opt)
    assert g is not None
    assert [f.code for f in g.findings] == ["GG102"]
    assert not any(p._post_accumulate_grad_hooks for p in net.parameters())
    assert gradguard.unguard(opt) is None  # already unguarded: nothing to do


def test_guard_returns_the_same_optimizer_object(net):
    """``guard`` returns the very optimizer it was given, type and all."""
    opt = torch.optim.AdamW(net.parameters())
    assert gradguard.guard(opt) is opt
    assert type(opt) is torch.optim.AdamW
    gradguard.unguard(opt)


def test_guarding_twice_is_a_no_op(net):
    """A second guard call reuses the first guard: one report per occurrence."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    gradguard.guard(opt, mode="log")
    gradguard.guard(opt, mode="log")
    g = gradguard.guard_of(opt)
    assert g is not None
    assert len(opt._optimizer_step_pre_hooks) == 1
    assert all(len(p._post_accumulate_grad_hooks) == 1 for p in net.parameters())
    loss_of(net, batches(1)[0]).backward()
    opt.zero_grad()
    opt.step()
    assert list(g.counts.values()) == [1]
    gradguard.unguard(opt)


def test_guarded_optimizer_pickles_deep_copies_and_round_trips_state_dict(net):
    """Pickle, deepcopy and state_dict see a plain optimizer with no gradguard state."""
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    plain = torch.optim.AdamW(Net().parameters(), lr=1e-3)
    with gradguard.guarding(opt, model=net):
        for b in batches(2):
            opt.zero_grad()
            loss_of(net, b).backward()
            opt.step()
        state = opt.state_dict()
        assert set(state) == set(plain.state_dict())
        assert "gradguard" not in repr(state)
        clone = pickle.loads(pickle.dumps(opt))
        assert "zero_grad" not in clone.__dict__
        dup = copy.deepcopy(opt)
        assert "zero_grad" not in dup.__dict__
        assert not dup._optimizer_step_pre_hooks
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        opt.load_state_dict(torch.load(buffer))
        opt.zero_grad()
        loss_of(net, batches(1)[0]).backward()
        opt.step()
    assert torch.equal(
        state["state"][0]["exp_avg"], pickle.loads(pickle.dumps(state))["state"][0]["exp_avg"]
    )


def test_gradients_are_not_kept_alive(net):
    """A cleared gradient is freed at once: gradguard holds no reference to it."""
    opt = gradguard.guard(torch.optim.SGD(net.parameters(), lr=0.1))
    loss_of(net, batches(1)[0]).backward()
    opt.step()
    refs = [weakref.ref(p.grad) for p in net.parameters()]
    opt.zero_grad()
    assert all(r() is None for r in refs)
    gradguard.unguard(opt)


def test_accumulate_grad_still_steals_the_incoming_buffer(net):
    """With gradguard watching, a fresh ``.grad`` is still the stolen buffer (version 0)."""
    opt = gradguard.guard(torch.optim.SGD(net.parameters(), lr=0.1))
    opt.zero_grad()
    loss_of(net, batches(1)[0]).backward()
    assert all(p.grad._version == 0 for p in net.parameters())
    gradguard.unguard(opt)


def test_model_and_optimizer_are_collected_after_unguard():
    """After unguard and del, the model, optimizer and gradients are garbage-collected."""
    net = Net()
    opt = gradguard.guard(torch.optim.Adam(net.parameters()), model=net, mode="log")
    loss_of(net, batches(1)[0]).backward()
    opt.zero_grad()
    opt.step()
    refs = [weakref.ref(net), weakref.ref(opt)]
    refs += [weakref.ref(t) for p in net.parameters() for t in (p, p.grad) if t is not None]
    gradguard.unguard(opt)
    del net, opt
    gc.collect()
    assert all(r() is None for r in refs)


def test_a_guarded_optimizer_collected_without_unguard_releases_its_hooks(net):
    """Dropping a guarded optimizer removes the hooks it put on the model's parameters."""
    opt = gradguard.guard(torch.optim.SGD(net.parameters(), lr=0.1))
    ref = weakref.ref(opt)
    del opt
    gc.collect()
    assert ref() is None
    assert not any(p._post_accumulate_grad_hooks for p in net.parameters())


class _TrainingLoop:
    """A long-running method that guards its optimizer, like a framework's fit loop."""

    def run(self) -> weakref.ref[torch.Tensor]:
        batch = torch.ones(1000)
        alive = weakref.ref(batch)
        net = Net()
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        with gradguard.guarding(opt, model=net, mode="strict"):
            loss_of(net, batches(1)[0]).backward()
            opt.step()
            del batch
            gc.collect()
            assert alive() is None, "a copy of the running loop's locals kept the batch alive"
        return alive


def test_guarding_from_a_method_keeps_none_of_its_locals_alive(monkeypatch):
    """Looking for a framework's optimizer wrapper on the call stack copies no loop's locals.

    In Python < 3.13 reading a running frame's locals keeps a copy of them
    until that frame returns: for a training loop, the whole run.
    """
    monkeypatch.setitem(sys.modules, "pytorch_lightning", types.ModuleType("pytorch_lightning"))
    assert _TrainingLoop().run()() is None
