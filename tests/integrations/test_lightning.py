"""PyTorch Lightning: automatic and manual optimization, under install() and the callback."""

from __future__ import annotations

import warnings

import pytest
import torch
from support import require
from torch import nn

import gradguard

pl = require("pytorch_lightning")
from gradguard.lightning import GradGuardCallback  # noqa: E402  (needs Lightning)

PARAMS = ("encoder.weight", "encoder.bias", "head.weight", "head.bias")
BATCHES = 8


class Auto(pl.LightningModule):
    """Automatic optimization: Lightning calls zero_grad, backward and step."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.encoder(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class SkipsZeroGrad(Auto):
    """A user override that was meant to save time and never clears."""

    def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
        pass


class ClearsInsideTheWindow(Auto):
    """Calls the module's zero_grad in training_step, wiping the accumulated micro-batches."""

    def training_step(self, batch, batch_idx):
        self.zero_grad()
        return super().training_step(batch, batch_idx)


class Manual(Auto):
    """Manual optimization; ``forget`` leaves out opt.zero_grad()."""

    def __init__(self, forget: bool) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.forget = forget

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        if not self.forget:
            opt.zero_grad()
        x, y = batch
        self.manual_backward(nn.functional.mse_loss(self(x), y))
        opt.step()


MANUAL_STEP_LINE = Manual.training_step.__code__.co_firstlineno + 6


def fit(model: pl.LightningModule, *callbacks: pl.Callback, **trainer_kw) -> None:
    """One epoch of ``BATCHES`` batches on the CPU, nothing written to disk."""
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randn(4 * BATCHES, 4, generator=g), torch.randn(4 * BATCHES, 1, generator=g)
    )
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        **trainer_kw,
    )
    with warnings.catch_warnings():
        # Lightning's own advice (more dataloader workers, a logging interval)
        # is not under test; gradguard's warnings are asserted through findings.
        warnings.filterwarnings("ignore", module="pytorch_lightning")
        warnings.filterwarnings("ignore", module="lightning_fabric")
        warnings.filterwarnings("ignore", message=".*treespec.*", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*num_workers.*")
        trainer.fit(model, loader)


def run_installed(model: pl.LightningModule, mode: str = "strict", **kw) -> list:
    """Fit under install(mode); return the summary rows."""
    gradguard.install(mode=mode)
    try:
        fit(model, **kw)
    finally:
        rows = gradguard.uninstall()
    return rows


@pytest.mark.parametrize("accumulate", [1, 3])
def test_automatic_optimization_is_silent_under_install(accumulate):
    """Lightning's own loop, with or without accumulate_grad_batches: silent in strict mode."""
    assert run_installed(Auto(), accumulate_grad_batches=accumulate) == []


@pytest.mark.parametrize("accumulate", [1, 3])
def test_automatic_optimization_is_silent_with_the_callback(accumulate):
    """The callback declares accumulate_grad_batches and judges from step 1: silent."""
    callback = GradGuardCallback(mode="strict")
    fit(Auto(), callback, accumulate_grad_batches=accumulate)
    assert callback.findings == []
    (g,) = callback.guards
    assert g.options.accumulation_steps == (accumulate if accumulate > 1 else None)
    assert g.closed


def test_overridden_optimizer_zero_grad_that_never_clears_is_stale():
    """A LightningModule whose optimizer_zero_grad does nothing: GG101 with its parameters."""
    callback = GradGuardCallback(mode="log")
    fit(SkipsZeroGrad(), callback)
    assert [f.code for f in callback.findings] == ["GG101"]
    assert callback.findings[0].params == PARAMS
    assert callback.findings[0].step == 2


def test_module_zero_grad_inside_an_accumulation_window_is_reported():
    """self.zero_grad() in training_step with accumulate_grad_batches=3: GG104 at step 1."""
    callback = GradGuardCallback(mode="log")
    fit(ClearsInsideTheWindow(), callback, accumulate_grad_batches=3)
    assert [f.code for f in callback.findings] == ["GG104"]
    assert callback.findings[0].step == 1


def test_runner_takes_accumulate_grad_batches_from_the_trainer():
    """Under install, the guard finds the Trainer's window through the LightningOptimizer."""
    rows = run_installed(ClearsInsideTheWindow(), mode="log", accumulate_grad_batches=3)
    assert [r.code for r in rows] == ["GG104"]


def test_manual_optimization_without_zero_grad_is_stale_at_the_users_line():
    """Manual optimization that forgets opt.zero_grad(): GG101 pointing at training_step."""
    rows = run_installed(Manual(forget=True), mode="log")
    assert [r.code for r in rows] == ["GG101"]
    assert rows[0].params == PARAMS
    assert rows[0].location.endswith(f"test_lightning.py:{MANUAL_STEP_LINE}")


def test_manual_optimization_with_zero_grad_is_silent():
    """Manual optimization done right: silent under install and with the callback."""
    assert run_installed(Manual(forget=False)) == []
    callback = GradGuardCallback(mode="strict")
    fit(Manual(forget=False), callback)
    assert callback.findings == []


def test_callback_in_strict_mode_stops_fit_with_the_finding():
    """Strict mode raises StaleGradientError out of trainer.fit at the second step."""
    callback = GradGuardCallback(mode="strict")
    with pytest.raises(gradguard.StaleGradientError) as info:
        fit(Manual(forget=True), callback)
    assert info.value.finding is not None
    assert info.value.finding.step == 2
    assert all(g.closed for g in callback.guards)


def test_callback_rejects_bad_options_at_construction():
    """A typo in the callback's options fails where it is written, not inside fit."""
    with pytest.raises(ValueError, match="mode"):
        GradGuardCallback(mode="strcit")
    with pytest.raises(TypeError):
        GradGuardCallback(check_ranks_every="2")


class GAN(pl.LightningModule):
    """Manual optimization of a GAN: the generator's update, then the discriminator's,
    each cleared after its own step. ``toggle``: each update under
    ``toggle_optimizer``, which freezes the other model's parameters (the fix)."""

    def __init__(self, toggle: bool) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.toggle = toggle
        self.generator = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 4))
        self.discriminator = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))

    def _update(self, opt, loss_of) -> None:
        if self.toggle:
            self.toggle_optimizer(opt)
        self.manual_backward(loss_of())
        opt.step()
        opt.zero_grad()
        if self.toggle:
            self.untoggle_optimizer(opt)

    def training_step(self, batch, batch_idx):
        real, z = batch
        opt_g, opt_d = self.optimizers()
        bce = nn.functional.binary_cross_entropy_with_logits
        ones, zeros = torch.ones(len(real), 1), torch.zeros(len(real), 1)
        self._update(opt_g, lambda: bce(self.discriminator(self.generator(z)), ones))
        fake = self.generator(z).detach()
        self._update(
            opt_d,
            lambda: bce(self.discriminator(real), ones) + bce(self.discriminator(fake), zeros),
        )

    def configure_optimizers(self):
        return (
            torch.optim.Adam(self.generator.parameters(), lr=1e-3),
            torch.optim.Adam(self.discriminator.parameters(), lr=1e-3),
        )


def test_a_gan_under_toggle_optimizer_is_silent():
    """``toggle_optimizer`` keeps the generator's backward out of the discriminator."""
    assert run_installed(GAN(toggle=True)) == []
    callback = GradGuardCallback(mode="strict")
    fit(GAN(toggle=True), callback)
    assert callback.findings == []


def test_a_gan_without_toggle_optimizer_leaks_the_generators_gradient():
    """Lightning 0.5's GAN template: the discriminator's steps apply the generator's loss
    too (GG106), named with the discriminator's parameters."""
    callback = GradGuardCallback(mode="log")
    fit(GAN(toggle=False), callback)
    found = [f for f in callback.findings if f.code == "GG106"]
    assert [f.params for f in found] == [
        (
            "discriminator.0.weight",
            "discriminator.0.bias",
            "discriminator.2.weight",
            "discriminator.2.bias",
        )
    ]
    assert [f.code for f in callback.findings] == ["GG106"]
