"""GG106 foreign-gradient: a step applying what a backward wrote for another update.

Two real forms fire (the GAN leak, the validation leak), naming the foreign
backward's line and the parameters; the patterns practitioners use every day
around several optimizers and validation stay silent in strict mode and train
bit-identically. Each silent pattern's buggy twin, where it has one, fires.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from twins import Guards, Wrap, assert_silent_and_identical

import gradguard

BCE = nn.BCEWithLogitsLoss()


def _line(marker: str) -> str:
    """``file:line`` of the line of this file ending with ``# marker``."""
    lines = Path(__file__).read_text().splitlines()
    (number,) = [n for n, text in enumerate(lines, 1) if text.endswith(f"# {marker}")]
    return f"tests/test_foreign.py:{number}"


def _fired(scenario, **options) -> list[gradguard.Finding]:
    """Every finding of ``scenario`` guarded in log mode, in the order of the steps."""
    guards = Guards("log", **options)
    try:
        scenario(guards)
    finally:
        guards.close()
    assert not any(g._failed for g in guards.guards), "the guard switched itself off"
    return sorted(guards.fired, key=lambda f: (f.optimizer, f.step))


def _gg106(scenario, **options) -> list[gradguard.Finding]:
    return [f for f in _fired(scenario, **options) if f.code == "GG106"]


def _gan() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    generator = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 4))
    discriminator = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    return generator, discriminator


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 4, generator=g) + 1.0, torch.randn(8, 3, generator=g)


def _params(*models: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for m in models for p in m.parameters()]


# -- the GAN leak ---------------------------------------------------------------


def gan_cleared_after_each_step(wrap: Wrap, *, freeze: bool = False, detach: bool = True):
    """Lightning 0.5's order: the generator's update, then the discriminator's, each
    cleared after its own step. ``freeze``: the discriminator is frozen during the
    generator's update (``toggle_optimizer``), the fix."""
    generator, discriminator = _gan()
    opt_g = wrap(torch.optim.Adam(generator.parameters(), lr=1e-3), model=generator)
    opt_d = wrap(torch.optim.Adam(discriminator.parameters(), lr=1e-3), model=discriminator)
    for i in range(4):
        real, z = _batch(i)
        if freeze:
            discriminator.requires_grad_(False)
        g_loss = BCE(discriminator(generator(z)), torch.ones(8, 1))
        g_loss.backward()  # generator-backward
        opt_g.step()
        opt_g.zero_grad()
        if freeze:
            discriminator.requires_grad_(True)
        fake = generator(z)
        fake = fake.detach() if detach else fake
        d_loss = BCE(discriminator(real), torch.ones(8, 1)) + BCE(
            discriminator(fake), torch.zeros(8, 1)
        )
        d_loss.backward()
        opt_d.step()  # discriminator-step
        opt_d.zero_grad()
    return _params(generator, discriminator)


def test_the_gan_leak_names_the_generators_backward_and_the_discriminators_parameters():
    """The discriminator's step applies the generator's backward with its own: GG106."""
    found = _gg106(gan_cleared_after_each_step)
    assert [(f.optimizer, f.step) for f in found] == [("Adam#1", s) for s in (1, 2, 3, 4)]
    first = found[0]
    assert first.params == ("0.weight", "0.bias", "2.weight", "2.bias")
    assert first.written_at == _line("generator-backward")
    assert first.location == _line("discriminator-step")
    assert "the backward of Adam#0's update" in first.message
    assert f"backward() at {_line('generator-backward')} wrote them" in first.message


def test_the_gan_leak_fails_a_strict_run():
    with pytest.raises(gradguard.ForeignGradientError, match="GG106"):
        gan_cleared_after_each_step(Guards("strict"))


def test_a_discriminator_frozen_during_the_generators_update_is_silent():
    """``toggle_optimizer``'s fix: the generator's backward writes nothing into it."""
    assert_silent_and_identical(lambda wrap: gan_cleared_after_each_step(wrap, freeze=True))


def test_the_dcgan_order_is_silent():
    """Each model cleared right before its own backward: the generator's part is dropped."""

    def dcgan(wrap: Wrap):
        generator, discriminator = _gan()
        opt_g = wrap(torch.optim.Adam(generator.parameters(), lr=1e-3), model=generator)
        opt_d = wrap(torch.optim.Adam(discriminator.parameters(), lr=1e-3), model=discriminator)
        for i in range(4):
            real, z = _batch(i)
            fake = generator(z)
            opt_d.zero_grad()
            BCE(discriminator(real), torch.ones(8, 1)).backward()
            BCE(discriminator(fake.detach()), torch.zeros(8, 1)).backward()
            opt_d.step()
            opt_g.zero_grad()
            BCE(discriminator(fake), torch.ones(8, 1)).backward()
            opt_g.step()
        return _params(generator, discriminator)

    assert_silent_and_identical(dcgan)


def test_wgan_gp_with_several_critic_steps_is_silent():
    """Five critic updates per generator update, a gradient penalty through
    ``autograd.grad``, the critic left trainable during the generator's update."""

    def wgan_gp(wrap: Wrap):
        generator, critic = _gan()
        opt_g = wrap(torch.optim.Adam(generator.parameters(), lr=1e-4), model=generator)
        opt_c = wrap(torch.optim.Adam(critic.parameters(), lr=1e-4), model=critic)
        for i in range(3):
            for j in range(5):
                real, z = _batch(10 * i + j)
                fake = generator(z).detach()
                mix = torch.rand(8, 1)
                between = (mix * real + (1 - mix) * fake).requires_grad_(True)
                (grad,) = torch.autograd.grad(critic(between).sum(), between, create_graph=True)
                penalty = ((grad.norm(dim=1) - 1) ** 2).mean()
                opt_c.zero_grad()
                (critic(fake).mean() - critic(real).mean() + 10 * penalty).backward()
                opt_c.step()
            opt_g.zero_grad()
            (-critic(generator(_batch(i)[1])).mean()).backward()
            opt_g.step()
        return _params(generator, critic)

    assert_silent_and_identical(wgan_gp)


def test_actor_critic_with_a_fresh_backward_per_optimizer_is_silent():
    """DDPG's order: the actor's loss runs through the critic, each cleared first."""

    def ddpg(wrap: Wrap):
        torch.manual_seed(0)
        actor = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
        critic = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 1))
        opt_a = wrap(torch.optim.Adam(actor.parameters(), lr=1e-3), model=actor)
        opt_c = wrap(torch.optim.Adam(critic.parameters(), lr=1e-3), model=critic)
        for i in range(4):
            state = _batch(i)[1]
            action, target = torch.randn(8, 2), torch.randn(8, 1)
            opt_c.zero_grad()
            nn.functional.mse_loss(critic(torch.cat([state, action], 1)), target).backward()
            opt_c.step()
            opt_a.zero_grad()
            (-critic(torch.cat([state, actor(state)], 1)).mean()).backward()
            opt_a.step()
        return _params(actor, critic)

    assert_silent_and_identical(ddpg)


def test_a_discriminator_loss_without_detach_is_not_told_apart():
    """Documented: both models leak into each other, the shape of one backward shared by
    two optimizers that step at different rates; GG106 stays silent."""
    found = _gg106(lambda wrap: gan_cleared_after_each_step(wrap, detach=False))
    assert found == []


# -- one backward, two optimizers --------------------------------------------------


def _two_parts(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))


@pytest.mark.parametrize("order", ["body-first", "head-first"])
@pytest.mark.parametrize("micro", [1, 3])
def test_one_backward_shared_by_two_optimizers_is_silent(order, micro):
    """Two optimizers over disjoint parts, stepped after the same backward passes."""

    def shared(wrap: Wrap):
        model = _two_parts()
        body = wrap(torch.optim.SGD(model[0].parameters(), lr=0.1), model=model)
        head = wrap(torch.optim.Adam(model[2].parameters(), lr=1e-3), model=model)
        opts = [body, head] if order == "body-first" else [head, body]
        for i in range(4 * micro):
            x, _ = _batch(i)
            (model(x).pow(2).mean() / micro).backward()
            if (i + 1) % micro == 0:
                for opt in opts:
                    opt.step()
                for opt in opts:
                    opt.zero_grad()
        return _params(model)

    assert_silent_and_identical(shared)


@pytest.mark.parametrize("order", ["head-first", "body-first"])
def test_two_optimizers_stepping_one_backward_at_different_rates_are_silent(order):
    """The head steps every micro-batch, the body accumulates four: every pass writes
    both, which tells it from the GAN leak."""

    def multirate(wrap: Wrap):
        model = _two_parts()
        body = wrap(torch.optim.SGD(model[0].parameters(), lr=0.1), model=model)
        head = wrap(torch.optim.SGD(model[2].parameters(), lr=0.1), model=model)
        for i in range(12):
            x, _ = _batch(i)
            model(x).pow(2).mean().backward()
            last = (i + 1) % 4 == 0
            if last and order == "body-first":
                body.step()
                body.zero_grad()
            head.step()
            head.zero_grad()
            if last and order == "head-first":
                body.step()
                body.zero_grad()
        return _params(model)

    assert_silent_and_identical(multirate)


# -- the validation leak ------------------------------------------------------------


class LossCompute:
    """The annotated transformer's: computes the loss, always backpropagates, and steps
    (then clears) only when given an optimizer."""

    def __init__(self, opt: torch.optim.Optimizer | None) -> None:
        self.opt = opt

    def __call__(self, out: torch.Tensor, y: torch.Tensor) -> float:
        loss = nn.functional.mse_loss(out, y)
        loss.backward()  # validation-backward
        if self.opt is not None:
            self.opt.step()  # training-step
            self.opt.zero_grad()
        return loss.item()


def run_epochs(wrap: Wrap, *, validate: str = "leak", clip: bool = False):
    """Two epochs of training and validation; ``validate`` says how validation runs:
    ``leak`` (backward in eval mode, nothing clears), ``no_grad``, ``cleared``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 1))
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.05), model=model)
    train_step = LossCompute(opt)
    for epoch in range(2):
        model.train()
        for i in range(3):
            x, _ = _batch(10 * epoch + i)
            out = model(x)
            if clip:
                loss = nn.functional.mse_loss(out, x[:, :1])
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
                opt.step()
                opt.zero_grad()
            else:
                train_step(out, x[:, :1])
        model.eval()
        for i in range(2):
            x, _ = _batch(100 + i)
            if validate == "no_grad":
                with torch.no_grad():
                    nn.functional.mse_loss(model(x), x[:, :1])
            else:
                LossCompute(None)(model(x), x[:, :1])
                if validate == "cleared":
                    opt.zero_grad()
    return _params(model)


def test_the_validation_leak_names_the_validation_backward():
    """The first training step after validation applies the validation batches too."""
    found = _gg106(run_epochs)
    assert [(f.step, f.params) for f in found] == [
        (4, ("0.weight", "0.bias", "2.weight", "2.bias"))
    ]
    assert found[0].written_at == _line("validation-backward")
    assert found[0].location == _line("training-step")
    assert "a validation backward in eval mode" in found[0].message


def test_the_validation_leak_is_found_in_a_loop_that_clips():
    """Clipped since backward: judged once the device says the gradients are not zeros."""
    found = _gg106(lambda wrap: run_epochs(wrap, clip=True))
    assert [f.step for f in found] == [4]


def test_the_validation_leak_fails_a_strict_run():
    with pytest.raises(gradguard.ForeignGradientError, match="GG106"):
        run_epochs(Guards("strict"))


@pytest.mark.parametrize("validate", ["no_grad", "cleared"])
def test_validation_under_no_grad_or_followed_by_a_clear_is_silent(validate):
    assert_silent_and_identical(lambda wrap: run_epochs(wrap, validate=validate))


def test_a_window_cleared_where_no_wrapper_sees_is_no_foreign_gradient():
    """Validation and training backward added up, then zeroed in place by the model:
    the step applies nothing (GG102), so nothing foreign."""

    def zeroed(wrap: Wrap):
        torch.manual_seed(0)
        model = _two_parts()
        opt = wrap(torch.optim.SGD(model.parameters(), lr=0.1), model=model)
        for i in range(3):
            x, _ = _batch(i)
            model.eval()
            model(x).pow(2).mean().backward()
            model.train()
            model(x).pow(2).mean().backward()
            model.zero_grad(set_to_none=False)
            opt.step()
        return _params(model)

    assert {f.code for f in _fired(zeroed)} == {"GG102"}


def test_accumulation_and_a_saliency_pass_followed_by_a_clear_are_silent():
    """Accumulating four micro-batches, with now and then a saliency map in eval mode
    whose parameter gradients are cleared before training goes on."""

    def saliency(wrap: Wrap):
        model = _two_parts()
        opt = wrap(torch.optim.AdamW(model.parameters(), lr=1e-3), model=model)
        for i in range(16):
            if i % 8 == 0:
                model.eval()
                x = _batch(i)[0].requires_grad_(True)
                model(x).sum().backward()
                opt.zero_grad()
                model.train()
            x, _ = _batch(i)
            (model(x).pow(2).mean() / 4).backward()
            if (i + 1) % 4 == 0:
                opt.step()
                opt.zero_grad()
        return _params(model)

    assert_silent_and_identical(saliency)
