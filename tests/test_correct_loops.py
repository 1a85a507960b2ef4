"""Correct loops, including everyday techniques: each must stay silent in strict mode."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import batches, loss_of
from torch import nn
from torch.utils.checkpoint import checkpoint

import gradguard


def strict(opt: torch.optim.Optimizer, model: nn.Module | None = None):
    """Guard ``opt`` in strict mode: any finding raises inside the loop."""
    return gradguard.guarding(opt, model=model, mode="strict")


def sgd(model: nn.Module, **kw) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=0.05, **kw)


@pytest.mark.parametrize(
    "make_opt",
    [
        pytest.param(lambda m: sgd(m), id="sgd"),
        pytest.param(lambda m: sgd(m, momentum=0.9, nesterov=True), id="sgd-nesterov"),
        pytest.param(lambda m: torch.optim.Adam(m.parameters(), foreach=True), id="adam-foreach"),
        pytest.param(lambda m: torch.optim.Adam(m.parameters(), foreach=False), id="adam-loop"),
        pytest.param(lambda m: torch.optim.AdamW(m.parameters(), fused=True), id="adamw-fused"),
        pytest.param(lambda m: torch.optim.SGD(m.parameters(), lr=0.1, fused=True), id="sgd-fused"),
        pytest.param(lambda m: torch.optim.RMSprop(m.parameters()), id="rmsprop"),
        pytest.param(lambda m: torch.optim.Adagrad(m.parameters()), id="adagrad"),
    ],
)
def test_zero_grad_at_the_top_of_the_loop(net, make_opt):
    """The canonical loop is silent for every optimizer implementation."""
    opt = make_opt(net)
    with strict(opt, net) as g:
        for b in batches():
            opt.zero_grad()
            loss_of(net, b).backward()
            opt.step()
    assert g.findings == []


def test_zero_grad_after_step(net):
    """Clearing right after the step is as correct as clearing before backward."""
    opt = sgd(net)
    with strict(opt, net) as g:
        for b in batches():
            loss_of(net, b).backward()
            opt.step()
            opt.zero_grad()
    assert g.findings == []


@pytest.mark.parametrize("clear_model", [False, True])
def test_set_to_none_false(net, clear_model):
    """Zeroing in place instead of freeing is silent, through optimizer or model."""
    opt = sgd(net, momentum=0.9)
    with strict(opt, net) as g:
        for b in batches():
            if clear_model:
                net.zero_grad(set_to_none=False)
            else:
                opt.zero_grad(set_to_none=False)
            loss_of(net, b).backward()
            opt.step()
    assert g.findings == []


def test_model_zero_grad(net):
    """Clearing through the model is silent."""
    opt = sgd(net)
    with strict(opt, net) as g:
        for b in batches():
            net.zero_grad()
            loss_of(net, b).backward()
            opt.step()
    assert g.findings == []


def test_manual_grad_none_loop(net):
    """Setting every ``p.grad = None`` by hand is silent."""
    opt = sgd(net)
    with strict(opt, net) as g:
        for b in batches():
            for p in net.parameters():
                p.grad = None
            loss_of(net, b).backward()
            opt.step()
    assert g.findings == []


@pytest.mark.parametrize("set_to_none", [True, False])
def test_intentional_accumulation_with_a_final_partial_window(net, set_to_none):
    """Accumulating 4 micro-batches per step, with a last window of 2, is silent."""
    opt = sgd(net)
    data = batches(10)
    with strict(opt, net) as g:
        opt.zero_grad(set_to_none=set_to_none)
        for i, b in enumerate(data):
            (loss_of(net, b) / 4).backward()
            if (i + 1) % 4 == 0 or i + 1 == len(data):
                opt.step()
                opt.zero_grad(set_to_none=set_to_none)
    assert g.findings == []


def test_several_losses_each_with_backward(net):
    """Two losses with their own backward (retain_graph) before one step are silent."""
    opt = sgd(net)
    with strict(opt, net) as g:
        for x, y in batches():
            opt.zero_grad()
            out = net(x)
            F.mse_loss(out, y).backward(retain_graph=True)
            out.abs().mean().backward()
            opt.step()
    assert g.findings == []


class Generator(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 4))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class Discriminator(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.LeakyReLU(0.2), nn.Linear(8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.mark.parametrize("clear", ["optimizer", "optimizer-in-place", "module", "module-in-place"])
def test_gan_with_two_optimizers(clear):
    """A GAN whose generator backward writes into the discriminator's grads is silent."""
    torch.manual_seed(0)
    G, D = Generator(), Discriminator()
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-3, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=1e-3, betas=(0.5, 0.999))
    bce = nn.BCEWithLogitsLoss()

    def zero(model: nn.Module, opt: torch.optim.Optimizer) -> None:
        in_place = clear.endswith("in-place")
        if clear.startswith("module"):
            model.zero_grad(set_to_none=not in_place)
        else:
            opt.zero_grad(set_to_none=not in_place)

    with strict(opt_g, G) as gg, strict(opt_d, D) as gd:
        for _ in range(6):
            real = torch.randn(8, 4)
            fake = G(torch.randn(8, 3))
            # DCGAN: discriminator on real and fake, two backward calls, one step
            zero(D, opt_d)
            bce(D(real), torch.ones(8, 1)).backward()
            bce(D(fake.detach()), torch.zeros(8, 1)).backward()
            opt_d.step()
            # generator: its backward also writes into D's gradients
            zero(G, opt_g)
            bce(D(fake), torch.ones(8, 1)).backward()
            opt_g.step()
    assert gg.findings == []
    assert gd.findings == []


def test_two_optimizers_over_disjoint_parts(net):
    """Separate optimizers for encoder and head, cleared through the model, are silent."""
    opt_a = torch.optim.SGD(net.encoder.parameters(), lr=0.1)
    opt_b = torch.optim.Adam(net.head.parameters())
    with strict(opt_a, net) as ga, strict(opt_b, net) as gb:
        for b in batches():
            net.zero_grad()
            loss_of(net, b).backward()
            opt_a.step()
            opt_b.step()
    assert ga.findings == []
    assert gb.findings == []


def test_lbfgs_with_a_closure_that_zeroes(net):
    """LBFGS runs zero_grad and backward inside step(closure): silent."""
    opt = torch.optim.LBFGS(net.parameters(), lr=0.5, max_iter=4)
    with strict(opt, net) as g:
        for b in batches(3):

            def closure(b=b):
                opt.zero_grad()
                loss = loss_of(net, b)
                loss.backward()
                return loss

            opt.step(closure)
    assert g.findings == []


@pytest.mark.parametrize("clip", ["norm", "value", "norm-foreach"])
def test_clipping_before_step(net, clip):
    """Clipping rewrites gradients in place before step: silent."""
    opt = sgd(net)
    with strict(opt, net) as g:
        for b in batches():
            opt.zero_grad()
            loss_of(net, b).backward()
            if clip == "norm":
                torch.nn.utils.clip_grad_norm_(net.parameters(), 0.1)
            elif clip == "norm-foreach":
                torch.nn.utils.clip_grad_norm_(net.parameters(), 0.1, foreach=True)
            else:
                torch.nn.utils.clip_grad_value_(net.parameters(), 0.01)
            opt.step()
    assert g.findings == []


def test_lr_schedulers(net):
    """Schedulers wrap step at instance level; stepping them is silent."""
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=2)
    with strict(opt, net) as g:
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
        for b in batches():
            opt.zero_grad()
            loss_of(net, b).backward()
            opt.step()
            warm.step()
            cosine.step()
    assert g.findings == []


def test_frozen_parameters_and_unfreezing_mid_training(net):
    """Frozen parameters in the optimizer, unfrozen after two steps, are silent."""
    for p in net.encoder.parameters():
        p.requires_grad_(False)
    opt = sgd(net)
    with strict(opt, net) as g:
        for i, b in enumerate(batches()):
            if i == 2:
                for p in net.encoder.parameters():
                    p.requires_grad_(True)
            opt.zero_grad()
            loss_of(net, b).backward()
            opt.step()
    assert g.findings == []


def test_progressive_unfreezing_with_add_param_group(net):
    """A frozen base added to the optimizer later with add_param_group is silent."""
    for p in net.encoder.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(net.head.parameters(), lr=1e-3)
    with strict(opt, net) as g:
        for i, b in enumerate(batches()):
            if i == 3:
                for p in net.encoder.parameters():
                    p.requires_grad_(True)
                opt.add_param_group({"params": list(net.encoder.parameters()), "lr": 1e-4})
            opt.zero_grad()
            loss_of(net, b).backward()
            opt.step()
    assert g.findings == []


def test_frozen_backbone_kept_out_of_a_second_optimizer(net):
    """An optimizer holding only frozen parameters steps on nothing, silently."""
    for p in net.encoder.parameters():
        p.requires_grad_(False)
    opt_head = sgd(net.head)
    opt_base = sgd(net.encoder)
    with strict(opt_head, net) as gh, strict(opt_base, net) as gb:
        for b in batches():
            opt_head.zero_grad()
            opt_base.zero_grad()
            loss_of(net, b).backward()
            opt_head.step()
            opt_base.step()
    assert gh.findings == []
    assert gb.findings == []


def test_several_param_groups(net):
    """Different learning rates per group are silent."""
    opt = torch.optim.SGD(
        [{"params": net.encoder.parameters(), "lr": 0.01}, {"params": net.head.parameters()}],
        lr=0.1,
    )
    with strict(opt, net) as g:
        for b in batches():
            opt.zero_grad()
            loss_of(net, b).backward()
            opt.step()
    assert g.findings == []


def test_truncated_backprop_through_time():
    """An RNN trained on chunks with a detached hidden state is silent."""
    torch.manual_seed(0)
    rnn, head = nn.GRU(3, 5, batch_first=True), nn.Linear(5, 1)
    model = nn.ModuleDict({"rnn": rnn, "head": head})
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    seq, target = torch.randn(2, 24, 3), torch.randn(2, 24, 1)
    with strict(opt, model) as g:
        h = None
        for t in range(0, 24, 6):
            opt.zero_grad()
            out, h = rnn(seq[:, t : t + 6], h)
            F.mse_loss(head(out), target[:, t : t + 6]).backward()
            h = h.detach()
            opt.step()
    assert g.findings == []


class ClippedSGD(torch.optim.SGD):
    """A subclass whose step adds work and calls ``super().step()``."""

    def step(self, closure=None):  # type: ignore[override]
        for group in self.param_groups:
            torch.nn.utils.clip_grad_norm_(group["params"], 1.0)
        return super().step(closure)


def test_subclass_calling_super_step(net):
    """A subclass's nested ``super().step()`` is one update, not two."""
    opt = ClippedSGD(net.parameters(), lr=0.1)
    with strict(opt, net) as g:
        for b in batches():
            opt.zero_grad()
            loss_of(net, b).backward()
            opt.step()
    assert g.findings == []


class Lookahead(torch.optim.Optimizer):
    """Lookahead (k fast steps, then pull towards slow weights) around a base optimizer."""

    def __init__(self, base: torch.optim.Optimizer, k: int = 3, alpha: float = 0.5) -> None:
        self.base, self.k, self.alpha, self.count = base, k, alpha, 0
        super().__init__(base.param_groups, {})
        self.param_groups = base.param_groups
        self.slow = [p.detach().clone() for g in base.param_groups for p in g["params"]]

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = self.base.step(closure)
        self.count += 1
        if self.count % self.k == 0:
            params = [p for g in self.param_groups for p in g["params"]]
            for p, slow in zip(params, self.slow, strict=True):
                slow.add_(p - slow, alpha=self.alpha)
                p.copy_(slow)
        return loss


def test_lookahead_wrapper_stepping_its_base(net):
    """A wrapper whose step calls its base optimizer's step is one update."""
    base = torch.optim.Adam(net.parameters(), lr=1e-3)
    opt = Lookahead(base)
    with strict(opt, net) as g, strict(base, net) as gb:
        for b in batches():
            opt.zero_grad()
            loss_of(net, b).backward()
            opt.step()
    assert g.findings == []
    assert gb.findings == []


class SAM(torch.optim.Optimizer):
    """Sharpness-aware minimisation: perturb, re-evaluate in a closure, step the base."""

    def __init__(self, params, base_cls, rho: float = 0.05, **kw) -> None:
        super().__init__(params, {"rho": rho, **kw})
        self.base = base_cls(self.param_groups, **kw)
        self.param_groups = self.base.param_groups

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.norm(torch.stack([p.grad.norm() for p in params]))
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                e = p.grad * (group["rho"] / (norm + 1e-12))
                p.add_(e)
                self.state[p]["e"] = e
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if "e" in self.state[p]:
                    p.sub_(self.state[p]["e"])
        self.base.step()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        closure = torch.enable_grad()(closure)
        self.first_step(zero_grad=True)
        closure()
        self.second_step()


def test_sam_with_a_closure(net):
    """SAM's two backward passes inside step(closure) are one update."""
    opt = SAM(net.parameters(), torch.optim.SGD, lr=0.1)
    with strict(opt, net) as g, strict(opt.base, net) as gb:
        for b in batches():

            def closure(b=b):
                loss = loss_of(net, b)
                loss.backward()
                return loss

            opt.zero_grad()
            loss_of(net, b).backward()
            opt.step(closure)
    assert g.findings == []
    assert gb.findings == []


def test_sam_two_step_form(net):
    """SAM used as first_step / backward / second_step is silent."""
    opt = SAM(net.parameters(), torch.optim.SGD, lr=0.1)
    with strict(opt, net) as g, strict(opt.base, net) as gb:
        for b in batches():
            loss_of(net, b).backward()
            opt.first_step(zero_grad=True)
            loss_of(net, b).backward()
            opt.second_step(zero_grad=True)
    assert g.findings == []
    assert gb.findings == []


def test_gradient_penalty_with_create_graph(net):
    """A gradient penalty built with autograd.grad(create_graph=True) is silent."""
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    with strict(opt, net) as g:
        for x, y in batches():
            opt.zero_grad()
            x = x.requires_grad_(True)
            out = net(x)
            (grad_x,) = torch.autograd.grad(out.sum(), x, create_graph=True)
            loss = F.mse_loss(out, y) + 0.1 * grad_x.pow(2).sum()
            loss.backward()
            opt.step()
    assert g.findings == []


@pytest.mark.filterwarnings("ignore:Using backward.. with create_graph=True:UserWarning")
def test_double_backward_into_existing_grads(net):
    """A second backward with create_graph=True onto existing grads is silent."""
    opt = sgd(net)
    with strict(opt, net) as g:
        for b in batches(3):
            opt.zero_grad()
            loss_of(net, b).backward()
            loss_of(net, b).backward(create_graph=True)
            opt.step()
    assert g.findings == []
    for p in net.parameters():
        p.grad = None  # drop the graph the create_graph backward left in .grad


def test_gradient_checkpointing(net):
    """Recomputing activations in backward with checkpoint() is silent."""
    opt = sgd(net)
    with strict(opt, net) as g:
        for x, y in batches():
            opt.zero_grad()
            h = checkpoint(net.encoder, x, use_reentrant=False)
            F.mse_loss(net.head(h), y).backward()
            opt.step()
    assert g.findings == []


class MoE(nn.Module):
    """Top-1 routing over four experts: most experts get no gradient on a given step."""

    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(4, 4)
        self.experts = nn.ModuleList(nn.Linear(4, 2) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        choice = self.router(x).argmax(dim=-1)
        out = torch.zeros(x.shape[0], 2)
        for i, expert in enumerate(self.experts):
            mask = choice == i
            if mask.any():
                out[mask] = expert(x[mask]) * self.router(x[mask]).softmax(-1)[:, i : i + 1]
        return out


@pytest.mark.parametrize("set_to_none", [True, False])
def test_mixture_of_experts_routing(set_to_none):
    """Experts that receive no tokens on some steps are silent."""
    torch.manual_seed(0)
    model = MoE()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with strict(opt, model) as g:
        for _ in range(8):
            x = torch.randn(3, 4)
            opt.zero_grad(set_to_none=set_to_none)
            model(x).pow(2).mean().backward()
            opt.step()
    assert g.findings == []


def test_ema_teacher_model(net):
    """An EMA copy updated from the student under no_grad is silent."""
    teacher = copy.deepcopy(net).requires_grad_(False)
    opt = sgd(net)
    with strict(opt, net) as g:
        for x, y in batches():
            opt.zero_grad()
            with torch.no_grad():
                target = teacher(x)
            (F.mse_loss(net(x), y) + F.mse_loss(net(x), target)).backward()
            opt.step()
            with torch.no_grad():
                for pt, ps in zip(teacher.parameters(), net.parameters(), strict=True):
                    pt.lerp_(ps, 0.01)
    assert g.findings == []


class LoRA(nn.Module):
    """A low-rank adapter beside a frozen linear layer."""

    def __init__(self, base: nn.Linear, rank: int = 2) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.a = nn.Parameter(torch.randn(rank, base.in_features) * 0.01)
        self.b = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + x @ self.a.t() @ self.b.t()


def test_adapters_on_a_frozen_base(net):
    """Only adapter parameters in the optimizer, base frozen: silent."""
    net.head = LoRA(net.head)
    for p in net.encoder.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    with strict(opt, net) as g:
        for b in batches():
            opt.zero_grad()
            loss_of(net, b).backward()
            opt.step()
    assert g.findings == []


def test_branch_used_every_few_steps_with_set_to_none_false(net):
    """A parameter unused on some steps keeps a zero grad and is still silent."""
    extra = nn.Linear(8, 2)
    model = nn.ModuleDict({"net": net, "extra": extra})
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with strict(opt, model) as g:
        for i, (x, y) in enumerate(batches()):
            opt.zero_grad(set_to_none=False)
            h = net.encoder(x)
            out = net.head(h) + (extra(h) if i % 3 == 0 else 0)
            F.mse_loss(out, y).backward()
            opt.step()
    assert g.findings == []


def test_gradient_inspection_pass_between_steps(net):
    """A saliency backward cleared before the next training step is silent."""
    opt = sgd(net)
    with strict(opt, net) as g:
        for i, (x, y) in enumerate(batches()):
            if i == 3:
                x_in = x.clone().requires_grad_(True)
                net(x_in).sum().backward()
                net.zero_grad()
            opt.zero_grad()
            F.mse_loss(net(x), y).backward()
            opt.step()
    assert g.findings == []


def test_guard_created_between_backward_and_step(net):
    """A guard attached mid-iteration does not misjudge the gradients already there."""
    opt = sgd(net)
    loss_of(net, batches(1)[0]).backward()
    with strict(opt, net) as g:
        opt.step()
        for b in batches():
            opt.zero_grad()
            loss_of(net, b).backward()
            opt.step()
    assert g.findings == []


def test_amp_grad_scaler_with_bfloat16_autocast(net):
    """GradScaler with autocast on the CPU, including unscale_ and clipping, is silent."""
    opt = sgd(net)
    scaler = torch.amp.GradScaler("cpu")
    with strict(opt, net) as g:
        for b in batches():
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_of(net, b)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
    assert g.findings == []


def test_amp_grad_scaler_skipped_step_is_silent(net):
    """A step the scaler skips for an inf gradient is neither GG102 nor GG103."""
    opt = sgd(net)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    with strict(opt, net) as g:
        for i, b in enumerate(batches()):
            opt.zero_grad()
            loss = loss_of(net, b)
            if i == 2:
                loss = loss * float("inf")
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    assert g.findings == []
    assert scaler.get_scale() < 2.0**16
