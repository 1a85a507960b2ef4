"""Gradient health and model-level checks: GG104, GG105, GG201, GG202, GG301-GG303."""

from __future__ import annotations

import math

import pytest
import structlog
import torch
import torch.nn.functional as F
from conftest import ALL, ENCODER, HEAD, batches, codes, loss_of
from torch import nn
from twins import Guards, Wrap, assert_silent_and_identical

import gradguard
import gradguard.testing


def train(net, opt, *, steps=6, hook=None, zero=True):
    """A correct loop; ``hook(i, net, opt, loss)`` may change the loss of step ``i``."""
    for i, b in enumerate(batches(steps)):
        if zero:
            opt.zero_grad()
        loss = loss_of(net, b)
        if hook is not None:
            loss = hook(i, net, opt, loss)
        loss.backward()
        opt.step()


# -- GG201 non-finite-gradient ---------------------------------------------------


def nan_into_head_bias(at):
    def hook(i, net, opt, loss):
        if i == at:
            return loss + (net.head.bias * torch.tensor(float("nan"))).sum()
        return loss

    return hook


def test_nan_gradient_names_the_parameter_and_step(net):
    """A NaN reaching one parameter's gradient is GG201 naming it, at its step."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with gradguard.guarding(opt, model=net, mode="log") as g:
        train(net, opt, hook=nan_into_head_bias(2))
    assert codes(g) == ["GG201"]
    assert g.findings[0].params == ("head.bias",)
    assert g.findings[0].step == 3


def test_strict_mode_raises_before_the_nan_is_applied(net):
    """In strict mode GG201 raises at the step, before the weights turn NaN."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with gradguard.guarding(opt, model=net, mode="strict"):
        with pytest.raises(gradguard.NonFiniteGradientError) as info:
            train(net, opt, hook=nan_into_head_bias(1))
        assert torch.isfinite(net.head.bias).all()
    assert info.value.finding.step == 2


def test_inf_gradient_is_non_finite(net):
    """An Inf gradient is GG201 as well."""
    opt = torch.optim.Adam(net.parameters())

    def hook(i, net, opt, loss):
        return loss + net.encoder[0].bias.sum() * float("inf") if i == 0 else loss

    with gradguard.guarding(opt, model=net, mode="log") as g:
        train(net, opt, steps=1, hook=hook)
    assert codes(g) == ["GG201"]
    assert g.findings[0].params == ("encoder.0.bias",)


class Bag(nn.Module):
    """A sparse embedding bag and a dense head, as in a recommender or word2vec."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(50, 8, sparse=True)
        self.head = nn.Linear(8, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(ids).mean(1))


def sparse_loop(optimizers: str, *, nan_at: int | None = None) -> list[tuple[str, int, tuple]]:
    """Train `Bag` with a sparse-capable optimizer for the embedding, findings as tuples."""
    torch.manual_seed(0)
    model = Bag()
    sparse = {
        "SparseAdam": lambda ps: torch.optim.SparseAdam(ps, lr=1e-2),
        "SGD": lambda ps: torch.optim.SGD(ps, lr=0.1),
        "Adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.1),
    }[optimizers]
    opts = [sparse(list(model.embedding.parameters())), torch.optim.SGD(model.head.parameters())]
    data = torch.Generator().manual_seed(0)
    fired: list[gradguard.Finding] = []
    guards = [gradguard.guard(o, model=model, mode="log") for o in opts]
    for g in map(gradguard.guard_of, guards):
        g._reporter.listeners.append(fired.append)
    try:
        with structlog.testing.capture_logs():
            for i in range(6):
                ids = torch.randint(0, 50, (16, 4), generator=data)
                for o in opts:
                    o.zero_grad()
                loss = model(ids).pow(2).mean()
                if i == nan_at:
                    loss = loss + model.embedding(ids).sum() * math.nan
                loss.backward()
                for o in opts:
                    o.step()
    finally:
        for o in opts:
            gradguard.unguard(o)
    return [(f.code, f.step, f.params) for f in fired]


# Raised by torch's Adagrad on sparse gradients, with or without gradguard.
SPARSE_INVARIANTS = "ignore:Sparse invariant checks are implicitly disabled:UserWarning"


@pytest.mark.filterwarnings(SPARSE_INVARIANTS)
@pytest.mark.parametrize("optimizer", ["SparseAdam", "SGD", "Adagrad"])
def test_nan_in_a_sparse_gradient_is_non_finite(optimizer):
    """``nn.Embedding(sparse=True)``: NaN in its sparse gradient is GG201, naming it."""
    got = sparse_loop(optimizer, nan_at=2)
    assert ("GG201", 3, ("embedding.weight",)) in got


@pytest.mark.filterwarnings(SPARSE_INVARIANTS)
@pytest.mark.parametrize("optimizer", ["SparseAdam", "SGD", "Adagrad"])
def test_sparse_gradients_are_silent_when_healthy(optimizer):
    """The correct twin: the same loop without the NaN reports nothing."""
    assert sparse_loop(optimizer) == []


def test_fused_optimizer_grad_scaler_skip_is_an_info_event(net):
    """A fused optimizer's step that the scaler skips for inf is logged, not GG201."""
    opt = torch.optim.Adam(net.parameters(), fused=True)
    scaler = torch.amp.GradScaler("cpu")
    with structlog.testing.capture_logs() as logs, gradguard.guarding(opt, mode="strict") as g:
        for i, b in enumerate(batches()):
            opt.zero_grad()
            loss = loss_of(net, b) * (float("inf") if i == 2 else 1.0)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    assert g.findings == []
    skipped = [e for e in logs if e["event"] == "skipped-step"]
    assert [e["step"] for e in skipped] == [3]


def test_numerics_can_be_switched_off(net):
    """``check_numerics=False`` disables GG201 and GG202."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with gradguard.guarding(opt, model=net, mode="strict", check_numerics=False) as g:
        train(net, opt, hook=nan_into_head_bias(2))
    assert g.findings == []


# -- GG202 exploding-gradient ----------------------------------------------------


def spike(at, factor):
    return lambda i, net, opt, loss: loss * factor if i == at else loss


def test_gradient_norm_jump_is_exploding_and_names_the_largest_shares(net):
    """A 1000x jump after warm-up is GG202 with the parameters carrying most of the norm."""
    opt = torch.optim.SGD(net.parameters(), lr=1e-4)
    with gradguard.guarding(opt, model=net, mode="log") as g:
        train(net, opt, steps=30, hook=spike(25, 1000.0))
    assert codes(g) == ["GG202"]
    f = g.findings[0]
    assert f.step == 26
    assert f.params
    assert set(f.params) <= set(ALL)
    assert "x the largest of any earlier step" in f.message


def test_absolute_max_grad_norm(net):
    """``max_grad_norm`` fires on any step above it, warm-up or not."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with gradguard.guarding(opt, model=net, mode="log", max_grad_norm=1e-6) as g:
        train(net, opt, steps=2)
    assert codes(g) == ["GG202"]
    assert g.findings[0].step == 1


def test_a_spike_in_the_first_steps_is_exploding(net):
    """No warm-up to hide in: a 40,000x spike at step 5 is GG202 at step 5 (no healthy
    run measured jumped even 3x past its earlier steps in its first ones)."""
    opt = torch.optim.SGD(net.parameters(), lr=1e-4)
    with gradguard.guarding(opt, model=net, mode="log") as g:
        train(net, opt, steps=10, hook=spike(4, 40_000.0))
    assert [(f.code, f.step) for f in g.findings] == [("GG202", 5)]


def test_the_first_steps_of_a_correct_loop_are_silent(net):
    """The correct twin: the same first steps without the spike."""
    opt = torch.optim.SGD(net.parameters(), lr=1e-4)
    with gradguard.guarding(opt, model=net, mode="strict") as g:
        train(net, opt, steps=10)
    assert g.findings == []


def clipped_lm(wrap: Wrap, *, blow_up_at: int | None = None, bad_batch_at: int | None = None):
    """A word-level LSTM language model trained with clip_grad_norm_(0.25) and SGD at lr 20,
    as pytorch/examples' word_language_model does, on a synthetic Markov-chain corpus."""
    torch.manual_seed(0)
    vocab = 40
    chain = torch.softmax(
        torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(1)) * 3, -1
    )
    tokens = [0]
    g = torch.Generator().manual_seed(2)
    for _ in range(2999):
        tokens.append(int(torch.multinomial(chain[tokens[-1]], 1, generator=g)))
    data = torch.tensor(tokens).view(10, -1).t()  # (time, batch)

    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Embedding(vocab, 32)
            self.rnn = nn.LSTM(32, 32)
            self.decoder = nn.Linear(32, vocab)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.decoder(self.rnn(self.encoder(x))[0])

    model = LM()
    opt = wrap(torch.optim.SGD(model.parameters(), lr=20.0), model)
    for step in range(60):
        i = (step * 20) % (data.size(0) - 21)
        x, y = data[i : i + 20], data[i + 1 : i + 21]
        opt.zero_grad()
        loss = F.cross_entropy(model(x).view(-1, vocab), y.reshape(-1))
        if step == bad_batch_at:
            loss = loss * 1e6  # one corrupt batch
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        if step == blow_up_at:
            opt.param_groups[0]["lr"] = 1e2  # the bug: a learning rate far too high
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def clipped_regression(wrap: Wrap, *, blow_up_at: int | None = None) -> list[torch.Tensor]:
    """An MLP regression clipped at 1.0 by clip_grad_norm_, SGD with momentum."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1)
    )
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), model)
    data = torch.Generator().manual_seed(0)
    for step in range(50):
        if step == blow_up_at:
            opt.param_groups[0]["lr"] = 1e2  # the bug: a learning rate far too high
        x = torch.randn(64, 8, generator=data)
        opt.zero_grad()
        F.mse_loss(model(x), x[:, :1] * 3).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_clipping_hides_no_explosion_that_lasts():
    """Clipping bounds every update, so the clipped norm never jumps; the norm backward
    produces does, and stays up: GG202 on it after 3 clipped steps in a row."""
    guards = Guards("log")
    try:
        with structlog.testing.capture_logs():
            clipped_regression(guards, blow_up_at=30)
    finally:
        guards.close()
    (f,) = [f for f in guards.fired if f.code == "GG202"][:1]
    assert 32 <= f.step <= 36
    assert "before clipping" in f.message
    assert "3 clipped steps in a row" in f.message


def test_a_clipped_regression_is_silent():
    """The correct twin: the same clipped loop at its learning rate, bit-identical."""
    assert_silent_and_identical(clipped_regression)


def test_a_bad_batch_tamed_by_clipping_is_silent():
    """One batch whose norm jumps a million-fold, clipped: its update is bounded, not an
    explosion; and the healthy clipped loop trains bit-identically."""
    assert_silent_and_identical(lambda wrap: clipped_lm(wrap, bad_batch_at=30))


def test_clipping_before_step_keeps_a_spike_silent(net):
    """A tamed spike in a small regression: silent."""
    opt = torch.optim.SGD(net.parameters(), lr=1e-4)

    def hook(i, net, opt, loss):
        return loss * 1000.0 if i == 25 else loss

    with gradguard.guarding(opt, model=net, mode="strict") as g:
        for i, b in enumerate(batches(30)):
            opt.zero_grad()
            hook(i, net, opt, loss_of(net, b)).backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 0.5)
            opt.step()
    assert g.findings == []


# Episode lengths of an actor-critic agent learning to balance a pole, as
# measured on pytorch/examples' CartPole: short random episodes, then a few
# episodes each two to three times longer than any before, then the cap.
EPISODES = [12, 9, 15, 11, 22, 14, 10, 31, 18, 25, 40, 28, 62, 59, 76, 112, 89, 219, 271, 140]
EPISODES += [622, 500, 1999, 900, 1999, 1999, 1500, 1999]


class ActorCritic(nn.Module):
    """pytorch/examples' actor-critic policy: one hidden layer, an action and a value head."""

    def __init__(self) -> None:
        super().__init__()
        self.affine1 = nn.Linear(4, 128)
        self.action_head = nn.Linear(128, 2)
        self.value_head = nn.Linear(128, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.affine1(x))
        return F.softmax(self.action_head(h), dim=-1), self.value_head(h)


def total_norm(model: nn.Module) -> float:
    """The total 2-norm of ``model``'s gradients."""
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()


def actor_critic(wrap: Wrap, norms: list[float]) -> list[torch.Tensor]:
    """pytorch/examples' actor-critic update, one per episode of the lengths in `EPISODES`."""
    torch.manual_seed(543)
    model = ActorCritic()
    opt = wrap(torch.optim.Adam(model.parameters(), lr=3e-2), model)
    states = torch.Generator().manual_seed(0)
    for length in EPISODES:
        probs, values = model(torch.randn(length, 4, generator=states) * 0.05)
        actions = torch.distributions.Categorical(probs)
        taken = actions.sample()
        returns = torch.tensor([0.99**t for t in range(length)]).flip(0).cumsum(0)
        returns = (returns - returns.mean()) / (returns.std() + 1e-7)
        advantage = returns - values.detach().squeeze(1)
        policy_loss = (-actions.log_prob(taken) * advantage).sum()
        value_loss = F.smooth_l1_loss(values.squeeze(1), returns, reduction="sum")
        opt.zero_grad()
        (policy_loss + value_loss).backward()
        norms.append(total_norm(model))
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_an_actor_critic_loss_summed_over_growing_episodes_is_not_exploding():
    """The episode's loss is a sum over its steps, so its norm follows the episode's
    length, up to 100x its median and 7x past any earlier one here: not an explosion."""
    norms: list[float] = []
    assert_silent_and_identical(lambda wrap: actor_critic(wrap, norms))
    plain = norms[: len(EPISODES)]
    early = sorted(plain[:20])[10]
    assert max(plain[20:]) > 30 * early  # the shape being tested: the norm follows the length


def two_stage(wrap: Wrap, norms: list[float]) -> list[torch.Tensor]:
    """Adam fits one target until converged, then a second one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = wrap(torch.optim.Adam(model.parameters(), lr=3e-3), model)
    data = torch.Generator().manual_seed(0)
    for step in range(700):
        x = torch.randn(64, 8, generator=data)
        y = x[:, :1].sin() if step < 500 else (x[:, 1:2] * 3).cos() * 2 + 1
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        norms.append(total_norm(model))
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_a_converged_model_moved_to_a_new_target_is_not_exploding():
    """Two-stage training: a converged model's norm jumps back to its first stage's scale."""
    norms: list[float] = []
    assert_silent_and_identical(lambda wrap: two_stage(wrap, norms))
    plain = norms[:700]
    converged = sorted(plain[400:500])[50]
    assert max(plain[500:]) > 20 * converged  # what a median-based rule called an explosion


def test_geometric_divergence_from_a_learning_rate_far_too_high():
    """SGD at a learning rate past stability grows the norm a few times per step: GG202
    once it has risen at each of 6 steps in a row by 100x, well before it overflows."""
    torch.manual_seed(0)
    model = nn.Linear(16, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    data = torch.Generator().manual_seed(0)
    with gradguard.guarding(opt, model=model, mode="log") as g:
        for step in range(60):
            if step == 25:
                opt.param_groups[0]["lr"] = 1.5  # the bug: a typo in the schedule
            x = torch.randn(64, 16, generator=data)
            opt.zero_grad()
            F.mse_loss(model(x), x.sum(1, keepdim=True)).backward()
            opt.step()
    assert codes(g) == ["GG202"]
    (f,) = g.findings
    assert 26 < f.step <= 36
    assert "rose at each of the last" in f.message
    assert torch.isfinite(model.weight).all()  # found long before it overflows


# -- GG104 accumulation-mismatch -------------------------------------------------


def accumulate(net, opt, data, *, every, clear_inside=False, declared=4, mode="log"):
    with gradguard.guarding(opt, model=net, mode=mode, accumulation_steps=declared) as g:
        opt.zero_grad()
        for i, b in enumerate(data):
            if clear_inside:
                net.zero_grad()  # the bug: wipes the micro-batches accumulated so far
            (loss_of(net, b) / declared).backward()
            if (i + 1) % every == 0 or i + 1 == len(data):
                opt.step()
                opt.zero_grad()
    return g


def test_stepping_after_more_micro_batches_than_declared(net):
    """Steps every 6 micro-batches with accumulation_steps=4 is GG104."""
    g = accumulate(net, torch.optim.SGD(net.parameters(), lr=0.1), batches(12), every=6)
    assert codes(g) == ["GG104"]
    assert "step after 6 micro-batches, accumulation_steps=4" in g.findings[0].message


def test_stepping_after_fewer_micro_batches_than_declared(net):
    """Steps every 2 micro-batches with accumulation_steps=4 is GG104 at the second one."""
    g = accumulate(net, torch.optim.SGD(net.parameters(), lr=0.1), batches(8), every=2)
    assert codes(g) == ["GG104"]
    assert g.findings[0].step == 2


def test_model_zero_grad_inside_the_window_is_reported(net):
    """A model.zero_grad() inside the window (the Accelerate-style bug) is GG104."""
    g = accumulate(
        net, torch.optim.SGD(net.parameters(), lr=0.1), batches(8), every=4, clear_inside=True
    )
    assert codes(g) == ["GG104"]
    assert g.findings[0].params == ALL
    assert "threw micro-batches away" in g.findings[0].message


def test_declared_accumulation_with_final_partial_windows_is_silent(net):
    """Windows of 4, 4, 2 per epoch, over two epochs, are silent."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with gradguard.guarding(opt, model=net, mode="strict", accumulation_steps=4) as g:
        for _epoch in range(2):
            data = batches(10)
            opt.zero_grad()
            for i, b in enumerate(data):
                (loss_of(net, b) / 4).backward()
                if (i + 1) % 4 == 0 or i + 1 == len(data):
                    opt.step()
                    opt.zero_grad()
    assert g.findings == []


# -- GG105 discarded-gradients ---------------------------------------------------


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_before_every_micro_batch_discards(net, set_to_none):
    """zero_grad at the top of every micro-step keeps only the last micro-batch: GG105."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with gradguard.guarding(opt, model=net, mode="log") as g:
        for i, b in enumerate(batches(16)):
            opt.zero_grad(set_to_none=set_to_none)
            (loss_of(net, b) / 4).backward()
            if (i + 1) % 4 == 0:
                opt.step()
    assert codes(g) == ["GG105"]
    assert g.findings[0].step == 3
    assert g.findings[0].params == ALL


def test_model_zero_grad_before_every_micro_batch_discards(net):
    """The same bug through model.zero_grad() (set to None, seen only by the hooks)."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with gradguard.guarding(opt, model=net, mode="log") as g:
        for i, b in enumerate(batches(16)):
            net.zero_grad()
            (loss_of(net, b) / 4).backward()
            if (i + 1) % 4 == 0:
                opt.step()
    assert codes(g) == ["GG105"]


def test_one_discard_per_epoch_is_silent(net):
    """A gradient-inspection backward thrown away once in a while is not GG105."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with gradguard.guarding(opt, model=net, mode="strict") as g:
        for i, b in enumerate(batches(12)):
            if i % 5 == 0:
                loss_of(net, b).backward()  # a saliency pass, cleared below
            opt.zero_grad()
            loss_of(net, b).backward()
            opt.step()
    assert g.findings == []


# -- GG301 unused-parameter ------------------------------------------------------


class TwoTowers(nn.Module):
    """A model whose second tower is detached by mistake."""

    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Linear(4, 2)
        self.right = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.left(x) + self.right(x).detach()


def test_detached_tower_is_unused():
    """Parameters behind a detach() never get gradients: GG301 after ``unused_after`` steps."""
    torch.manual_seed(0)
    model = TwoTowers()
    opt = torch.optim.Adam(model.parameters())
    with gradguard.guarding(opt, model=model, mode="log", unused_after=5) as g:
        for x, y in batches(8):
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()
    assert codes(g) == ["GG301"]
    assert g.findings[0].params == ("right.weight", "right.bias")
    assert g.findings[0].step == 5


def test_stem_under_no_grad_is_unused(net):
    """An encoder run under no_grad never trains: GG301 names it."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with gradguard.guarding(opt, model=net, mode="log", unused_after=3) as g:
        for x, y in batches(4):
            opt.zero_grad()
            with torch.no_grad():
                h = net.encoder(x)
            F.mse_loss(net.head(h), y).backward()
            opt.step()
    assert codes(g) == ["GG301"]
    assert g.findings[0].params == ENCODER


def test_unused_parameters_are_reported_at_close_if_the_run_is_short():
    """A run shorter than ``unused_after`` still reports at close... only once it is due."""
    torch.manual_seed(0)
    model = TwoTowers()
    opt = torch.optim.Adam(model.parameters())
    with gradguard.guarding(opt, model=model, mode="log", unused_after=50) as g:
        for x, y in batches(4):
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()
    assert g.findings == []


def test_branch_used_every_few_steps_is_not_unused(net):
    """A branch used every third step within the window is silent."""
    extra = nn.Linear(8, 2)
    model = nn.ModuleDict({"net": net, "extra": extra})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradguard.guarding(opt, model=model, mode="strict", unused_after=5) as g:
        for i, (x, y) in enumerate(batches(12)):
            opt.zero_grad()
            h = net.encoder(x)
            out = net.head(h) + (extra(h) if i % 3 == 2 else 0)
            F.mse_loss(out, y).backward()
            opt.step()
    assert g.findings == []


class RoundRobinExperts(nn.Module):
    """Four experts, one per step in turn: each is idle three steps out of four."""

    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(4, 2) for _ in range(4))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.experts[self.calls % 4](x)


def test_sparsely_used_experts_within_the_window_are_silent():
    """Experts each used once every four steps are not unused with a window of 5."""
    torch.manual_seed(0)
    model = RoundRobinExperts()
    opt = torch.optim.Adam(model.parameters())
    with gradguard.guarding(opt, model=model, mode="strict", unused_after=5) as g:
        for x, y in batches(12):
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()
    assert g.findings == []


# -- GG302 unoptimized-parameter -------------------------------------------------


def test_layer_added_after_the_optimizer_was_built(net):
    """A layer created after the optimizer trains nothing: GG302 names it."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net.head = nn.Sequential(net.head, nn.Linear(2, 2))
    with gradguard.guarding(opt, model=net, mode="log") as g:
        train(net, opt, steps=3)
    assert codes(g) == ["GG302"]
    assert g.findings[0].params == ("head.1.weight", "head.1.bias")


def test_forgotten_param_group(net):
    """An optimizer built over the encoder alone leaves the head unoptimized."""
    opt = torch.optim.SGD(net.encoder.parameters(), lr=0.1)
    with gradguard.guarding(opt, model=net, mode="log") as g:
        train(net, opt, steps=3, zero=False)
    assert "GG302" in codes(g)
    gg302 = next(f for f in g.findings if f.code == "GG302")
    assert gg302.params == HEAD


def test_replaced_head_is_unoptimized_and_the_old_one_unused(net):
    """Replacing the head after building the optimizer: new head GG302, old head GG301."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net.head = nn.Linear(8, 2)
    with gradguard.guarding(opt, model=net, mode="log", unused_after=3) as g:
        train(net, opt, steps=4)
    assert codes(g) == ["GG302", "GG301"]
    assert g.findings[0].params == HEAD
    assert g.findings[1].params == ("group0.param2[2x8]", "group0.param3[2]")


def test_frozen_parameters_outside_the_optimizer_are_silent(net):
    """Frozen layers left out of the optimizer are not unoptimized."""
    for p in net.encoder.parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD(net.head.parameters(), lr=0.1)
    with gradguard.guarding(opt, model=net, mode="strict") as g:
        train(net, opt, steps=3)
    assert g.findings == []


def test_parameters_held_by_an_unguarded_optimizer_are_silent(net):
    """A second optimizer that gradguard does not watch still counts as optimizing."""
    opt = torch.optim.SGD(net.encoder.parameters(), lr=0.1)
    other = torch.optim.SGD(net.head.parameters(), lr=0.1)
    with gradguard.guarding(opt, model=net, mode="strict") as g:
        for b in batches(3):
            net.zero_grad()
            loss_of(net, b).backward()
            opt.step()
            other.step()
    assert g.findings == []


class Student(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class Teacher(Student):
    """A larger copy: the model distilled from."""


def distill(teacher_use: str, *, steps: int = 30, teacher_opt_every: int = 0) -> list[tuple]:
    """Distil a `Teacher` into a `Student` under ``install()``, only the student's optimizer
    guarded, with ``model=student``: gradguard is told nothing of the teacher.

    ``teacher_use``: ``"trainable"`` runs the teacher with gradients (the bug),
    ``"frozen"`` freezes it first, ``"no_grad"`` runs it under ``torch.no_grad()``.
    With ``teacher_opt_every``, an unguarded optimizer also trains the teacher,
    stepping that often. Returns ``(code, step, params)`` per finding.
    """
    gradguard.install(mode="log")
    try:
        torch.manual_seed(0)
        student, teacher = Student(), Teacher()  # both function-local
        if teacher_use == "frozen":
            teacher.requires_grad_(False)
        opt = torch.optim.SGD(student.parameters(), lr=0.05)
        teacher_opt = torch.optim.SGD(teacher.parameters(), lr=0.01) if teacher_opt_every else None
        with (
            structlog.testing.capture_logs(),
            gradguard.guarding(opt, model=student, mode="log") as g,
            gradguard.testing.record(g) as fired,
        ):
            for i, (x, _) in enumerate(batches(steps)):
                opt.zero_grad()
                if teacher_use == "no_grad":
                    with torch.no_grad():
                        target = teacher(x)
                else:
                    target = teacher(x)
                F.mse_loss(student(x), target).backward()
                opt.step()
                if teacher_opt is not None and (i + 1) % teacher_opt_every == 0:
                    teacher_opt.step()
                    teacher_opt.zero_grad()
    finally:
        gradguard.uninstall()
    return [(f.code, f.step, f.params) for f in fired]


TEACHER = (
    "Teacher.body.0.weight",
    "Teacher.body.0.bias",
    "Teacher.head.weight",
    "Teacher.head.bias",
)


def test_a_trainable_teacher_no_optimizer_holds_is_unoptimized():
    """A teacher left trainable gets gradients every step that nothing applies: GG302,
    found among the modules built during the session, confirmed at the next check,
    named by class."""
    assert distill("trainable") == [("GG302", 27, TEACHER)]


@pytest.mark.parametrize("teacher_use", ["frozen", "no_grad"])
def test_a_frozen_or_no_grad_teacher_is_silent(teacher_use):
    """The correct twins: a frozen teacher, or one run under no_grad, gets no gradient."""
    assert distill(teacher_use) == []


@pytest.mark.parametrize("every", [1, 10])
def test_a_teacher_its_own_unguarded_optimizer_trains_is_silent(every):
    """Co-training: an optimizer gradguard does not watch holds the teacher, stepping
    every step or every tenth: it is seen stepping before any report."""
    assert distill("trainable", teacher_opt_every=every) == []


# -- GG303 eval-mode-step --------------------------------------------------------


def test_training_resumed_in_eval_mode(net):
    """Validation left the model in eval mode and training went on: GG303."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with gradguard.guarding(opt, model=net, mode="log") as g:
        train(net, opt, steps=2)
        net.eval()
        with torch.no_grad():
            loss_of(net, batches(1)[0])
        train(net, opt, steps=2)  # forgot net.train()
    assert codes(g) == ["GG303"]
    assert g.findings[0].step == 3
    assert g.findings[0].params == ALL


def test_validation_then_train_is_silent(net):
    """eval() for validation and train() before training again is correct."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with gradguard.guarding(opt, model=net, mode="strict") as g:
        train(net, opt, steps=2)
        net.eval()
        with torch.no_grad():
            loss_of(net, batches(1)[0])
        net.train()
        train(net, opt, steps=2)
    assert g.findings == []


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def test_frozen_backbone_kept_in_eval_is_silent():
    """A frozen backbone kept in eval for its BatchNorm, the head training: silent."""
    torch.manual_seed(0)
    model = BNNet()
    model.backbone.requires_grad_(False)
    opt = torch.optim.SGD(model.head.parameters(), lr=0.1)
    with gradguard.guarding(opt, model=model, mode="strict") as g:
        model.train()
        model.backbone.eval()
        train(model, opt, steps=3)
    assert g.findings == []


def test_batchnorm_layers_alone_in_eval_are_silent():
    """BatchNorm layers in eval to freeze their statistics, the rest training: silent."""
    torch.manual_seed(0)
    model = BNNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradguard.guarding(opt, model=model, mode="strict") as g:
        model.train()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.eval()
        train(model, opt, steps=3)
    assert g.findings == []


class ClassificationTask(nn.Module):
    """A task module owning the model and its loss, as timm's ``train.py`` builds one."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.loss = nn.MSELoss()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss(self.model(x), y)


def task_epochs(entry: str, *, resume_train: bool) -> list[str]:
    """Two epochs of a task module; validation puts only the inner model in eval.

    ``entry`` guards the optimizer with ``guard(opt)`` (no ``model=``) or, as
    ``gradguard run`` does, with ``install()``. Returns the finding codes.
    """
    torch.manual_seed(0)
    task = ClassificationTask(BNNet())
    opt = torch.optim.SGD(task.parameters(), lr=0.1)
    fired: list[gradguard.Finding] = []
    handle = gradguard._dispatch.add_sink(lambda f, first: fired.append(f))
    if entry == "install":
        gradguard.install(mode="log")
    else:
        gradguard.guard(opt, mode="log")
    try:
        with structlog.testing.capture_logs():
            task.train()
            for _epoch in range(2):
                if resume_train:
                    task.train()  # the fix: training mode for everything the task owns
                for x, y in batches(4):
                    opt.zero_grad()
                    task(x, y).backward()
                    opt.step()
                task.model.eval()  # validation, on the inner model only
                with torch.no_grad():
                    task(*batches(1)[0])
    finally:
        gradguard.uninstall()
        gradguard.unguard(opt)
        handle.remove()
    return [f"{f.code}@{f.step}" for f in fired]


@pytest.mark.parametrize("entry", ["guard", "install"])
def test_training_in_eval_mode_behind_a_wrapper_module(entry):
    """timm's task module stays in train mode while the model it wraps was left in eval."""
    # From the first step of the second epoch, every step; install() judges from step 2.
    assert task_epochs(entry, resume_train=False) == [f"GG303@{step}" for step in (5, 6, 7, 8)]


@pytest.mark.parametrize("entry", ["guard", "install"])
def test_a_wrapper_module_put_back_in_train_mode_is_silent(entry):
    """The correct twin: ``task.train()`` at the start of every epoch."""
    assert task_epochs(entry, resume_train=True) == []


def test_a_backbone_kept_in_eval_while_it_trains_is_silent():
    """Fine-tuning with the backbone in eval (frozen statistics, no dropout) and the head
    in train mode is deliberate: one training module makes it a training step."""
    torch.manual_seed(0)
    model = BNNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradguard.guarding(opt, model=model, mode="strict") as g:
        model.train()
        model.backbone.eval()
        train(model, opt, steps=3)
    assert g.findings == []


def test_bad_options_are_rejected_at_the_call(net):
    """Out-of-range options are ValueErrors, wrong types TypeErrors, naming the option."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="accumulation_steps must be a positive int; got 0"):
        gradguard.guard(opt, accumulation_steps=0)
    with pytest.raises(TypeError, match="accumulation_steps must be a positive int or None"):
        gradguard.guard(opt, accumulation_steps="4")
    with pytest.raises(ValueError, match="explode_factor must be a finite number above 1"):
        gradguard.guard(opt, explode_factor=0.5)
    with pytest.raises(TypeError, match="check_numerics must be True or False"):
        gradguard.guard(opt, check_numerics="yes")
    assert gradguard.guard_of(opt) is None


def test_numerics_every_sets_the_cadence(net):
    """``numerics_every=3`` judges norms on steps 1, 4, 7, ... only."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with (
        gradguard.guarding(opt, model=net, mode="log", max_grad_norm=1e-6, numerics_every=3) as g,
        gradguard.testing.record(g) as seen,
    ):
        train(net, opt, steps=7)
    assert [f.step for f in seen] == [1, 4, 7]


def test_numerics_run_every_step_on_a_small_model(net):
    """By default a cheap norm pass runs on every step."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with (
        gradguard.guarding(opt, model=net, mode="log", max_grad_norm=1e-6) as g,
        gradguard.testing.record(g) as seen,
    ):
        train(net, opt, steps=6)
    assert [f.step for f in seen] == [1, 2, 3, 4, 5, 6]
