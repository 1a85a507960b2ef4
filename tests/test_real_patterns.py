"""Correct patterns from real programs: silent in strict mode and bit-identical to unguarded.

Each was a false alarm (or switched the guard off) on real code: float64 and
complex networks, parameters concatenated in the forward, gradients written by
hand, the "optimizer step in backward" tutorial, sanitising NaN gradients.
Each correct pattern has a buggy twin of the same shape that must still fire.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from twins import Wrap, assert_silent_and_identical, findings

import gradguard


def weights(*models: nn.Module) -> list[torch.Tensor]:
    """Every parameter of ``models``, detached copies."""
    return [p.detach().clone() for m in models for p in m.parameters()]


def data(n: int, *shape: int, seed: int = 0, dtype: torch.dtype = torch.float32):
    """``n`` fixed random tensors of ``shape``."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g).to(dtype) for _ in range(n)]


# -- 1. every dtype torch trains in ---------------------------------------------


class SequenceModel(nn.Module):
    """Two stacked LSTM cells predicting the next value of a wave, one step at a time."""

    def __init__(self) -> None:
        super().__init__()
        self.cell1 = nn.LSTMCell(1, 8)
        self.cell2 = nn.LSTMCell(8, 8)
        self.out = nn.Linear(8, 1)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        h1 = c1 = seq.new_zeros(seq.size(0), 8)
        h2 = c2 = seq.new_zeros(seq.size(0), 8)
        outputs = []
        for t in range(seq.size(1)):
            h1, c1 = self.cell1(seq[:, t : t + 1], (h1, c1))
            h2, c2 = self.cell2(h1, (h2, c2))
            outputs.append(self.out(h2))
        return torch.cat(outputs, dim=1)


def waves() -> tuple[torch.Tensor, torch.Tensor]:
    """Sine waves with random phases, as float64, and their next values."""
    t = torch.arange(21, dtype=torch.float64)
    phase = torch.arange(6, dtype=torch.float64)[:, None] * 0.7
    series = torch.sin(t / 3.0 + phase)
    return series[:, :-1], series[:, 1:]


def test_lbfgs_on_a_float64_sequence_model():
    """LBFGS with a closure on a float64 network (time-series prediction, PINNs)."""

    def scenario(wrap: Wrap) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = SequenceModel().double()
        opt = wrap(torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4), model)
        x, y = waves()
        for _ in range(3):

            def closure() -> torch.Tensor:
                opt.zero_grad()
                loss = F.mse_loss(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)
        return weights(model)

    assert_silent_and_identical(scenario)


DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
COMPLEX = [torch.complex64, torch.complex128]


def mlp(dtype: torch.dtype) -> nn.Module:
    """A small seeded MLP in ``dtype`` (a complex one has no activation in between)."""
    torch.manual_seed(0)
    if dtype.is_complex:
        return nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)).to(dtype)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).to(dtype)


def dtype_loop(
    wrap: Wrap, dtype: torch.dtype, *, zero_grad: bool = True, nan_at: int | None = None
) -> list[torch.Tensor]:
    """SGD on ``mlp(dtype)`` with clipping: the numeric checks and the zero check both run."""
    model = mlp(dtype)
    opt = wrap(torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9), model)
    for i, x in enumerate(data(6, 16, 4, dtype=dtype)):
        if zero_grad:
            opt.zero_grad()
        out = model(x if i != nan_at else x * math.nan)
        loss = out.abs().pow(2).mean() if dtype.is_complex else out.float().pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
    return weights(model)


COMPLEX_WARNING = "ignore:Complex modules are a new feature:UserWarning"


@pytest.mark.filterwarnings(COMPLEX_WARNING)
@pytest.mark.parametrize("dtype", DTYPES + COMPLEX, ids=str)
def test_every_dtype_is_checked_silently(dtype):
    """Every dtype torch trains in passes every check: no internal error, no finding."""
    assert_silent_and_identical(lambda wrap: dtype_loop(wrap, dtype))


NAMES = ("0.weight", "0.bias", "2.weight", "2.bias")


@pytest.mark.filterwarnings(COMPLEX_WARNING)
@pytest.mark.parametrize("dtype", DTYPES + COMPLEX, ids=str)
def test_every_dtype_still_reports_a_missing_zero_grad(dtype):
    """The buggy twin: without zero_grad every dtype is GG101 at step 2, on every parameter."""
    names = NAMES if not dtype.is_complex else ("0.weight", "0.bias", "1.weight", "1.bias")
    got = findings(lambda wrap: dtype_loop(wrap, dtype, zero_grad=False))
    assert got[0] == ("GG101", 2, names)


@pytest.mark.filterwarnings(COMPLEX_WARNING)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex128], ids=str)
def test_every_dtype_reports_nan_gradients(dtype):
    """GG201 on float64 and complex gradients, the case that used to disable the guard."""
    got = findings(lambda wrap: dtype_loop(wrap, dtype, nan_at=3))
    assert ("GG201", 4) in [(code, step) for code, step, _ in got]


def test_a_float64_norm_beyond_float32_range_is_not_called_non_finite():
    """A float64 gradient norm of 1e100 is finite: no GG201 (a float32 norm would be Inf)."""

    def scenario(wrap: Wrap) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Linear(3, 1, bias=False).double()
        opt = wrap(torch.optim.SGD(model.parameters(), lr=1e-150), model)
        for x in data(4, 5, 3, dtype=torch.float64):
            opt.zero_grad()
            (model(x).sum() * 1e100).backward()
            opt.step()
        return weights(model)

    assert_silent_and_identical(scenario)


def test_mixed_dtypes_name_the_right_parameters():
    """One optimizer over float64, float32 and bfloat16 layers: GG201 names the NaN one only."""

    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wide = nn.Linear(4, 4).double()
            self.mid = nn.Linear(4, 4)
            self.low = nn.Linear(4, 2).to(torch.bfloat16)

        def forward(self, x: torch.Tensor, poison: bool) -> torch.Tensor:
            h = self.mid(self.wide(x.double()).float())
            if poison:
                h = h.detach() * math.nan  # NaN reaches the last layer's gradients only
            return self.low(h.to(torch.bfloat16)).float()

    def scenario(wrap: Wrap, poison_at: int | None = None) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = Mixed()
        opt = wrap(torch.optim.SGD(model.parameters(), lr=0.01), model)
        for i, x in enumerate(data(4, 8, 4)):
            opt.zero_grad()
            model(x, poison=i == poison_at).pow(2).mean().backward()
            opt.step()
        return weights(model)

    assert_silent_and_identical(scenario)
    got = findings(lambda wrap: scenario(wrap, poison_at=2))
    assert got[0] == ("GG201", 3, ("low.weight", "low.bias"))


def test_parameters_on_the_meta_device():
    """A dry run on the meta device (shapes only) has no values to check: silent, guard on."""
    model = nn.Sequential(nn.Linear(4, 8, device="meta"), nn.ReLU(), nn.Linear(8, 2, device="meta"))
    opt = torch.optim.AdamW(model.parameters())
    with gradguard.guarding(opt, model=model, mode="strict") as g:
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(4, 4, device="meta")).sum().backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        assert not g.closed
    assert g.findings == []


# -- 2. parameters concatenated in the forward ----------------------------------


class FusedProjections(nn.Module):
    """q/k/v projections run as one matmul over concatenated weights and biases (WavLM),
    and a bank of experts stacked into one batched matmul."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(4, 4)
        self.k = nn.Linear(4, 4, bias=False)
        self.v = nn.Linear(4, 4)
        self.experts = nn.ModuleList(nn.Linear(4, 4, bias=False) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = torch.cat((self.q.weight, self.k.weight, self.v.weight))
        bias = torch.cat((self.q.bias, torch.zeros_like(self.q.bias), self.v.bias))
        qkv = F.linear(x, weight, bias)
        stacked = torch.stack([e.weight for e in self.experts])  # (3, 4, 4)
        routed = torch.bmm(qkv.view(-1, 3, 4).transpose(0, 1), stacked.transpose(1, 2))
        return routed.sum(0)


FUSED = (
    "q.weight",
    "q.bias",
    "k.weight",
    "v.weight",
    "v.bias",
    "experts.0.weight",
    "experts.1.weight",
    "experts.2.weight",
)


def fused_loop(wrap: Wrap, *, micro: int, bug: str | None = None, steps: int = 5):
    """AdamW over `FusedProjections`, ``micro`` micro-batches per step."""
    torch.manual_seed(0)
    model = FusedProjections()
    opt = wrap(torch.optim.AdamW(model.parameters(), lr=1e-3), model)
    batches = iter(data(steps * micro, 6, 4))
    for step in range(steps):
        if bug == "validation-backward" and step == 2:
            model.eval()  # a validation batch backpropagated, and nothing clears it
            model(torch.ones(6, 4)).pow(2).mean().backward()
            model.train()
        for m in range(micro):
            if bug == "clear-every-micro-batch" or (bug == "clear-inside-window" and m == 1):
                opt.zero_grad()
            (model(next(batches)).pow(2).mean() / micro).backward()
        opt.step()
        if bug != "no-zero-grad":
            opt.zero_grad()
    return weights(model)


@pytest.mark.parametrize("micro", [1, 2, 3])
@pytest.mark.parametrize("declared", [False, True], ids=["undeclared", "declared"])
def test_accumulating_through_concatenated_parameters(micro, declared):
    """Gradients that are slices of one cat/stack buffer share a version counter: silent."""
    options = {"accumulation_steps": micro} if declared else {}
    assert_silent_and_identical(lambda wrap: fused_loop(wrap, micro=micro), **options)


@pytest.mark.parametrize("micro", [1, 2])
def test_concatenated_parameters_still_report_a_missing_zero_grad(micro):
    """The buggy twin: GG101 at step 2, naming every concatenated parameter."""
    got = findings(lambda wrap: fused_loop(wrap, micro=micro, bug="no-zero-grad"))
    assert got[0] == ("GG101", 2, FUSED)


@pytest.mark.parametrize("micro", [1, 2])
def test_concatenated_parameters_still_report_a_validation_leak(micro):
    """Slices of one buffer (the shared path): an eval-mode backward added to training's
    is GG106 at the step that applies both."""
    got = findings(lambda wrap: fused_loop(wrap, micro=micro, bug="validation-backward"))
    assert got == [("GG106", 3, FUSED)]


def test_concatenated_parameters_still_report_a_clear_inside_the_window():
    """The buggy twins: a clear inside a declared window (GG104), or before every
    micro-batch with nothing declared (GG105)."""
    got = findings(
        lambda wrap: fused_loop(wrap, micro=2, bug="clear-inside-window"), accumulation_steps=2
    )
    assert got[0][:2] == ("GG104", 1)
    assert set(got[0][2]) == set(FUSED)
    got = findings(lambda wrap: fused_loop(wrap, micro=2, bug="clear-every-micro-batch"))
    assert got[0][:2] == ("GG105", 3)


# -- 3. gradients written by hand -----------------------------------------------


def regression() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def target(x: torch.Tensor) -> torch.Tensor:
    return x.sum(1, keepdim=True).sin()


def autograd_grad_loop(wrap: Wrap, *, how: str, skip: str | None = None, steps: int = 25):
    """Gradients from torch.autograd.grad, put into .grad by ``how`` each step."""
    model = regression()
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model)
    for x in data(steps, 16, 4):
        if how == "copy-after-optimizer-clear":
            opt.zero_grad(set_to_none=False)
        elif how == "copy-after-model-clear":
            model.zero_grad(set_to_none=False)
        named = [(n, p) for n, p in model.named_parameters() if n != skip]
        grads = torch.autograd.grad(F.mse_loss(model(x), target(x)), [p for _, p in named])
        for (_, p), g in zip(named, grads, strict=True):
            if how == "assign" or p.grad is None:
                p.grad = g
            else:
                p.grad.copy_(g)
        opt.step()
    return weights(model)


@pytest.mark.parametrize(
    "how", ["assign", "copy", "copy-after-optimizer-clear", "copy-after-model-clear"]
)
def test_gradients_from_autograd_grad(how):
    """``p.grad = g`` or ``p.grad.copy_(g)`` every step, for longer than GG301 waits: silent."""
    assert_silent_and_identical(lambda wrap: autograd_grad_loop(wrap, how=how))


def test_a_parameter_never_given_a_gradient_by_hand_is_still_unused():
    """The buggy twin: the one parameter the loop forgets is GG301 at step 20, alone."""
    got = findings(lambda wrap: autograd_grad_loop(wrap, how="assign", skip="2.bias"))
    assert got == [("GG301", 20, ("2.bias",))]


def test_a_gradient_written_by_hand_and_stepped_twice_is_stale():
    """The buggy twin: stepping again on the same hand-written gradient is GG101."""

    def scenario(wrap: Wrap) -> None:
        model = regression()
        opt = wrap(torch.optim.SGD(model.parameters(), lr=0.05), model)
        for x in data(3, 16, 4):
            grads = torch.autograd.grad(F.mse_loss(model(x), target(x)), list(model.parameters()))
            for p, g in zip(model.parameters(), grads, strict=True):
                p.grad = g
            opt.step()
            opt.step()  # the bug: one gradient, two updates

    assert findings(scenario)[0] == ("GG101", 2, NAMES)


def test_fp32_master_weights():
    """A bfloat16 model trained through float32 master copies: ``master.grad = p.grad.float()``."""

    def scenario(wrap: Wrap) -> list[torch.Tensor]:
        model = regression().to(torch.bfloat16)
        master = [p.detach().float().requires_grad_() for p in model.parameters()]
        opt = wrap(torch.optim.AdamW(master, lr=1e-3))
        for x in data(25, 16, 4, dtype=torch.bfloat16):
            model.zero_grad()
            F.mse_loss(model(x).float(), target(x.float())).backward()
            for m, p in zip(master, model.parameters(), strict=True):
                m.grad = p.grad.float()
            opt.step()
            with torch.no_grad():
                for m, p in zip(master, model.parameters(), strict=True):
                    p.copy_(m)
        return [m.detach().clone() for m in master]

    assert_silent_and_identical(scenario)


def per_sample_loop(wrap: Wrap, steps: int = 22) -> list[torch.Tensor]:
    """DP-SGD: per-sample gradients from torch.func, clipped, summed, noised, assigned."""
    from torch.func import functional_call, grad, vmap

    model = regression()
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.05), model)
    noise = torch.Generator().manual_seed(1)

    def loss_of(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, params, (x[None],))
        return F.mse_loss(out, target(x[None]))

    for x in data(steps, 8, 4):
        params = {n: p.detach() for n, p in model.named_parameters()}
        per_sample = vmap(grad(loss_of), in_dims=(None, 0))(params, x)
        norms = torch.stack([g.flatten(1).norm(dim=1) for g in per_sample.values()]).norm(dim=0)
        scale = (1.0 / (norms + 1e-6)).clamp(max=1.0)
        for n, p in model.named_parameters():
            g = (per_sample[n] * scale.view(-1, *[1] * (per_sample[n].dim() - 1))).sum(0)
            p.grad = (g + 0.01 * torch.randn(g.shape, generator=noise)) / x.size(0)
        opt.step()
    return weights(model)


def test_dp_sgd_with_per_sample_gradients_from_torch_func():
    """DP-SGD's hand-assigned gradients, for longer than GG301 waits: silent."""
    assert_silent_and_identical(per_sample_loop)


@pytest.mark.parametrize("in_place", [False, True], ids=["p.grad = p.grad / 2", "div_"])
def test_averaging_by_hand_after_backward(in_place):
    """Scaling backward's gradients by hand before the step is silent; without
    zero_grad it is still GG101 (the averaged gradient holds an applied one)."""

    def scenario(wrap: Wrap, zero_grad: bool = True) -> list[torch.Tensor]:
        model = regression()
        opt = wrap(torch.optim.SGD(model.parameters(), lr=0.05), model)
        for x in data(5, 16, 4):
            if zero_grad:
                opt.zero_grad()
            F.mse_loss(model(x), target(x)).backward()
            for p in model.parameters():
                if in_place:
                    p.grad.div_(2)
                else:
                    p.grad = p.grad / 2
            opt.step()
        return weights(model)

    assert_silent_and_identical(scenario)
    assert findings(lambda wrap: scenario(wrap, zero_grad=False))[0] == ("GG101", 2, NAMES)


# -- 4. the tutorial's optimizer step in backward -------------------------------


def step_in_backward(wrap: Wrap | None, *, clear: bool = True, steps: int = 22):
    """One optimizer per parameter, stepped from its post-accumulate hook, then cleared.

    ``wrap`` is applied after the hooks are registered, as ``gradguard run``
    and ``install()`` attach: the guard's hook runs after the user's.
    """
    model = regression()
    optimizers = {p: torch.optim.SGD([p], lr=0.05) for p in model.parameters()}

    def hook(p: torch.Tensor) -> None:
        optimizers[p].step()
        if clear:
            optimizers[p].zero_grad()

    handles = [p.register_post_accumulate_grad_hook(hook) for p in model.parameters()]
    if wrap is not None:
        for opt in optimizers.values():
            wrap(opt, model)
    for x in data(steps, 16, 4):
        F.mse_loss(model(x), target(x)).backward()
    for h in handles:
        h.remove()
    return weights(model)


def test_optimizer_step_in_backward():
    """The PyTorch tutorial's pattern, guard attached after the user's hooks: silent."""
    assert_silent_and_identical(step_in_backward)


def test_optimizer_step_in_backward_under_install():
    """The same under ``gradguard.install(mode="strict")``, which attaches at the first step."""
    expected = step_in_backward(None)
    gradguard.install(mode="strict")
    try:
        got = step_in_backward(None)
    finally:
        rows = gradguard.uninstall()
    assert rows == []
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))


def test_optimizer_step_in_backward_that_never_clears_is_stale():
    """The buggy twin: a hook that steps but never clears accumulates onto applied gradients."""
    got = findings(lambda wrap: step_in_backward(wrap, clear=False, steps=3))
    assert {code for code, _, _ in got} == {"GG101"}
    assert {params for _, _, params in got} == {(name,) for name in NAMES}


# -- 5. an optimizer that holds its own closure ----------------------------------


class StoredClosureSAM(torch.optim.Optimizer):
    """Sharpness-aware minimisation that runs a closure stored by ``set_closure`` (GSAM's API)."""

    def __init__(self, params, base: type[torch.optim.Optimizer], rho: float = 0.05, **kw):
        super().__init__(params, {"rho": rho})
        self.base = base(self.param_groups, **kw)
        self.closure: Callable[[], torch.Tensor] | None = None

    def set_closure(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        def closure() -> torch.Tensor:
            self.base.zero_grad()
            with torch.enable_grad():
                loss = F.mse_loss(model(x), y)
            loss.backward()
            return loss.detach()

        self.closure = closure

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        assert self.closure is not None
        loss = self.closure()
        moved = []
        norm = torch.norm(
            torch.stack([p.grad.norm() for g in self.param_groups for p in g["params"]])
        )
        for group in self.param_groups:
            for p in group["params"]:
                e = p.grad * group["rho"] / (norm + 1e-12)
                p.add_(e)
                moved.append((p, e))
        self.closure()
        for p, e in moved:
            p.sub_(e)
        self.base.step()
        return loss


def stored_closure_loop(wrap: Wrap, steps: int = 4) -> list[torch.Tensor]:
    model = regression()
    opt = wrap(StoredClosureSAM(model.parameters(), torch.optim.SGD, lr=0.05), model)
    for x in data(steps, 16, 4):
        opt.set_closure(model, x, target(x))
        opt.step()
    return weights(model)


def test_an_optimizer_running_its_stored_closure():
    """``set_closure(...)`` then a plain ``step()``: the step makes its own gradients."""
    assert_silent_and_identical(stored_closure_loop)


def test_a_plain_step_with_nothing_to_apply_is_still_reported_when_it_returns():
    """The buggy twins: a step with no backward (GG103) and a second step on one
    backward (GG101) are judged when the step returns, and still reported."""

    def no_backward(wrap: Wrap) -> None:
        model = regression()
        opt = wrap(torch.optim.SGD(model.parameters(), lr=0.05), model)
        opt.step()

    def twice(wrap: Wrap) -> None:
        model = regression()
        opt = wrap(torch.optim.SGD(model.parameters(), lr=0.05), model)
        F.mse_loss(model(data(1, 16, 4)[0]), torch.zeros(16, 1)).backward()
        opt.step()
        opt.step()

    assert findings(no_backward) == [("GG103", 1, NAMES)]
    assert findings(twice) == [("GG101", 2, NAMES)]


def test_strict_mode_raises_a_step_with_nothing_to_apply_when_it_returns():
    """Strict mode raises GG103 out of the very ``step()`` call."""
    model = regression()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with (
        gradguard.guarding(opt, model=model, mode="strict"),
        pytest.raises(gradguard.StepWithoutBackwardError),
    ):
        opt.step()


# -- 6. sanitising gradients in place ---------------------------------------------


def sanitised_loop(wrap: Wrap, *, per_tensor: bool = False, bug: bool = False, steps: int = 10):
    """NaN losses on some batches, sanitised with nan_to_num_ before the step."""
    model = regression()
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.05), model)
    for i, x in enumerate(data(steps, 16, 4)):
        opt.zero_grad()
        loss = F.mse_loss(model(x), target(x))
        if i in (2, 3, 4, 7):  # bad batches, three of them in a row
            loss = loss * math.nan
        loss.backward()
        if bug:
            model.zero_grad(set_to_none=False)  # the bug: a clear no wrapper sees
        for p in model.parameters():
            if not per_tensor or not torch.isfinite(p.grad).all():
                p.grad.nan_to_num_(nan=0.0)
        opt.step()
    return weights(model)


@pytest.mark.parametrize("per_tensor", [False, True], ids=["every-gradient", "non-finite-only"])
def test_sanitising_nan_gradients_is_not_a_clear(per_tensor):
    """Zeros nan_to_num_ leaves of a NaN backward, on several steps in a row: silent."""
    assert_silent_and_identical(lambda wrap: sanitised_loop(wrap, per_tensor=per_tensor))


def test_a_clear_no_wrapper_sees_is_still_reported_among_sanitised_steps():
    """The buggy twin: ``model.zero_grad(set_to_none=False)`` before the sanitising pass
    is GG102 from its second step on."""
    got = findings(lambda wrap: sanitised_loop(wrap, bug=True))
    assert got[0] == ("GG102", 2, NAMES)
