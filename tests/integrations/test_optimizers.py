"""Optimizer variants: for-loop, foreach and fused kernels, LBFGS, and one from another package.

ZeroRedundancyOptimizer needs a process group and runs in ``test_ddp.py``.
Capturable optimizers need CUDA: torch refuses ``capturable=True`` for CPU
parameters.
"""

from __future__ import annotations

import os

import pytest
import torch
from support import require
from torch import nn

import gradguard

PARAMS = ("0.weight", "0.bias", "2.weight", "2.bias")


def variants() -> list:
    """Every built-in optimizer with each implementation this CPU runs."""
    out = []
    for cls in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adagrad):
        for impl in ("for-loop", "foreach", "fused"):
            out.append(pytest.param(cls, impl, id=f"{cls.__name__}-{impl}"))
    for cls in (torch.optim.RMSprop, torch.optim.NAdam, torch.optim.RAdam, torch.optim.Adamax):
        for impl in ("for-loop", "foreach"):
            out.append(pytest.param(cls, impl, id=f"{cls.__name__}-{impl}"))
    return out


def make(cls: type[torch.optim.Optimizer], impl: str, params) -> torch.optim.Optimizer:
    """``cls`` over ``params`` with the implementation named by ``impl``."""
    kw = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    return cls(params, lr=0.01, **kw[impl])


def model() -> nn.Module:
    """A small seeded MLP."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def loop(net: nn.Module, opt: torch.optim.Optimizer, *, zero_grad: bool, steps: int = 4) -> None:
    """A plain loop, optionally without zero_grad."""
    for i in range(steps):
        if zero_grad:
            opt.zero_grad()
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(i))
        net(x).pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize(("cls", "impl"), variants())
def test_every_implementation_is_silent_when_correct(cls, impl):
    """Each optimizer and kernel kind: a correct loop is silent in strict mode."""
    net = model()
    opt = make(cls, impl, net.parameters())
    with gradguard.guarding(opt, model=net, mode="strict") as g:
        loop(net, opt, zero_grad=True)
    assert g.findings == []


@pytest.mark.parametrize(("cls", "impl"), variants())
def test_every_implementation_reports_a_missing_zero_grad(cls, impl):
    """Each optimizer and kernel kind: a missing zero_grad is GG101 at step 2, all params."""
    net = model()
    opt = make(cls, impl, net.parameters())
    with gradguard.guarding(opt, model=net, mode="log") as g:
        loop(net, opt, zero_grad=False)
    assert [(f.code, f.step, f.params) for f in g.findings] == [("GG101", 2, PARAMS)]


@pytest.mark.parametrize("zero_grad", [True, False], ids=["correct", "missing-zero-grad"])
def test_lbfgs_closure_is_judged_when_the_step_returns(zero_grad):
    """LBFGS evaluates its closure inside step(): silent when it clears, GG101 when it does not."""
    net = model()
    opt = torch.optim.LBFGS(net.parameters(), lr=0.1, max_iter=3)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    with gradguard.guarding(opt, model=net, mode="log") as g:
        for _ in range(3):

            def closure() -> torch.Tensor:
                if zero_grad:
                    opt.zero_grad()
                loss = net(x).pow(2).mean()
                loss.backward()
                return loss

            opt.step(closure)
    assert [(f.code, f.step) for f in g.findings] == ([] if zero_grad else [("GG101", 2)])


@pytest.mark.parametrize("zero_grad", [True, False], ids=["correct", "missing-zero-grad"])
def test_an_optimizer_from_another_package(zero_grad):
    """transformers' Adafactor subclasses torch.optim.Optimizer: judged like a built-in one."""
    transformers = require("transformers")
    net = model()
    opt = transformers.Adafactor(net.parameters(), lr=1e-3, relative_step=False)
    with gradguard.guarding(opt, model=net, mode="log") as g:
        loop(net, opt, zero_grad=zero_grad)
    assert [(f.code, f.step) for f in g.findings] == ([] if zero_grad else [("GG101", 2)])


def sam_family(kind: str, wrap) -> list[torch.Tensor]:
    """pytorch-optimizer's GSAM with its stored closure, or SAM with a closure, as documented."""
    po = require("pytorch_optimizer")
    net = model()
    data = [torch.randn(8, 4, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    if kind == "GSAM":
        base = torch.optim.SGD(net.parameters(), lr=0.05)
        schedule = torch.optim.lr_scheduler.StepLR(base, step_size=10)
        rho = po.ProportionScheduler(schedule, max_lr=0.05)
        opt = wrap(po.GSAM(net.parameters(), base, model=net, rho_scheduler=rho), net)
        for x in data:
            opt.set_closure(lambda out, y: (out - y).pow(2).mean(), x, x[:, :2])
            opt.step()  # runs the stored closure: no closure argument
            schedule.step()
            opt.update_rho_t()
    else:
        opt = wrap(po.SAM(net.parameters(), torch.optim.SGD, lr=0.05), net)
        for x in data:
            opt.zero_grad()

            def closure(x: torch.Tensor = x) -> torch.Tensor:
                opt.zero_grad()
                loss = (net(x) - x[:, :2]).pow(2).mean()
                loss.backward()
                return loss

            closure()
            opt.step(closure)
    return [p.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize("kind", ["GSAM", "SAM"])
@pytest.mark.parametrize("entry", ["guard", "install"])
def test_sharpness_aware_optimizers_from_pytorch_optimizer(kind, entry):
    """GSAM's ``set_closure`` then a plain ``step()``, and SAM's closure: silent, bit-identical."""
    plain = sam_family(kind, lambda opt, net: opt)
    guards: list[gradguard.Guard] = []
    if entry == "install":
        gradguard.install(mode="strict")
        try:
            guarded = sam_family(kind, lambda opt, net: opt)
        finally:
            assert gradguard.uninstall() == []
    else:

        def wrap(opt, net):
            gradguard.guard(opt, model=net, mode="strict")
            guards.append(gradguard.guard_of(opt))
            return opt

        guarded = sam_family(kind, wrap)
        for g in guards:
            assert g.findings == []
            g.close()
    assert all(torch.equal(a, b) for a, b in zip(plain, guarded, strict=True))


@pytest.mark.cuda
@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
def test_capturable_optimizers_on_cuda(cls):
    """Capturable Adam/AdamW keep their step counters on the GPU: silent, then GG101."""
    net = model().cuda()
    opt = cls(net.parameters(), lr=1e-3, capturable=True)
    with gradguard.guarding(opt, model=net, mode="strict") as g:
        for i in range(3):
            opt.zero_grad()
            net(torch.randn(8, 4, device="cuda") + i).pow(2).mean().backward()
            opt.step()
    assert g.findings == []
    with gradguard.guarding(opt, model=net, mode="log") as g:
        loop_cuda = [torch.randn(8, 4, device="cuda") for _ in range(3)]
        for x in loop_cuda:
            net(x).pow(2).mean().backward()
            opt.step()
    assert [f.code for f in g.findings] == ["GG101"]


# The line of sam_family that steps each kind: where its findings must point.
SAM_STEP_LINES = {
    "GSAM": "            opt.step()  # runs the stored closure: no closure argument",
    "SAM": "            opt.step(closure)",
}


@pytest.mark.parametrize("kind", ["GSAM", "SAM"])
def test_a_finding_inside_a_sam_step_names_the_users_line(kind):
    """GSAM and SAM step their base optimizer inside their own step(): a finding there
    (a model left in eval mode, GG303) names the user's opt.step() line, not pytorch-optimizer's."""
    guards: list[gradguard.Guard] = []

    def wrap(opt, net):
        net.eval()
        gradguard.guard(opt.base_optimizer, model=net, mode="log")
        guards.append(gradguard.guard_of(opt.base_optimizer))
        return opt

    sam_family(kind, wrap)
    (guard,) = guards
    guard.close()
    with open(__file__, encoding="utf-8") as f:
        lines = [text.rstrip("\n") for text in f]
    start = next(i for i, text in enumerate(lines) if text.startswith("def sam_family("))
    line = lines.index(SAM_STEP_LINES[kind], start) + 1
    assert [(f.code, f.location) for f in guard.findings] == [
        ("GG303", f"{os.path.relpath(__file__)}:{line}")
    ]
