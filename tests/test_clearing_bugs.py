"""Buggy loops: each must be reported with the right code, step and parameter names."""

from __future__ import annotations

import pytest
import torch
from conftest import ALL, ENCODER, HEAD, Net, batches, codes, loss_of

import gradguard


def run(loop, net: Net, *, mode: str = "log", opt=None) -> gradguard.Guard:
    """Run ``loop(net, opt)`` under a guard in ``mode`` and return the closed guard."""
    opt = opt or torch.optim.SGD(net.parameters(), lr=0.1)
    with gradguard.guarding(opt, model=net, mode=mode) as g:
        loop(net, opt)
    return g


# -- GG101 stale-gradient ------------------------------------------------------


def test_missing_zero_grad_is_stale_from_the_second_step(net):
    """Never clearing re-applies every earlier gradient: GG101 at step 2, all params."""

    def loop(net, opt):
        for b in batches():
            loss_of(net, b).backward()
            opt.step()

    g = run(loop, net)
    assert codes(g) == ["GG101"]
    (f,) = g.findings
    assert f.step == 2
    assert f.params == ALL
    assert f.optimizer.startswith("SGD#")
    assert f.location.endswith(f"test_clearing_bugs.py:{loop.__code__.co_firstlineno + 3}")
    assert g.counts[f] == 5


def test_zero_grad_once_before_the_loop_is_stale(net):
    """A single zero_grad before the loop clears nothing that matters."""

    def loop(net, opt):
        opt.zero_grad()
        for b in batches():
            loss_of(net, b).backward()
            opt.step()

    g = run(loop, net)
    assert codes(g) == ["GG101"]
    assert g.findings[0].params == ALL


def test_zero_grad_inside_a_rarely_true_if_is_stale(net):
    """Clearing only every third step leaves the steps in between stale."""

    def loop(net, opt):
        for i, b in enumerate(batches()):
            if i % 3 == 0:
                opt.zero_grad()
            loss_of(net, b).backward()
            opt.step()

    g = run(loop, net)
    assert codes(g) == ["GG101"]
    assert {f.step for f in g.findings} == {2}
    assert g.findings[0].params == ALL
    assert sum(g.counts.values()) == 4  # steps 2, 3, 5, 6


def test_zero_grad_on_the_wrong_optimizer_names_the_other_ones_params(net):
    """Clearing optimizer A twice and never B leaves B's parameters stale."""
    opt_a = torch.optim.SGD(net.encoder.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(net.head.parameters(), lr=0.1)
    with (
        gradguard.guarding(opt_a, model=net, mode="log") as ga,
        gradguard.guarding(opt_b, model=net, mode="log") as gb,
    ):
        for b in batches():
            opt_a.zero_grad()
            opt_a.zero_grad()  # meant opt_b
            loss_of(net, b).backward()
            opt_a.step()
            opt_b.step()
    assert ga.findings == []
    assert codes(gb) == ["GG101"]
    assert gb.findings[0].params == HEAD


def test_zero_grad_on_the_wrong_model_is_stale(net):
    """Clearing another model's gradients leaves this model's stale."""
    torch.manual_seed(3)
    other = Net()

    def loop(net, opt):
        for b in batches():
            other.zero_grad()
            loss_of(net, b).backward()
            opt.step()

    g = run(loop, net)
    assert codes(g) == ["GG101"]
    assert g.findings[0].params == ALL


def test_zero_grad_covering_only_a_submodule_names_only_the_rest(net):
    """Clearing the encoder alone leaves exactly the head's gradients stale."""

    def loop(net, opt):
        for b in batches():
            net.encoder.zero_grad()
            loss_of(net, b).backward()
            opt.step()

    g = run(loop, net)
    assert codes(g) == ["GG101"]
    assert g.findings[0].params == HEAD


def test_second_step_without_backward_reapplies_the_same_gradient(net):
    """Stepping twice on one backward applies the same gradient twice."""

    def loop(net, opt):
        for b in batches(2):
            opt.zero_grad()
            loss_of(net, b).backward()
            opt.step()
            opt.step()

    g = run(loop, net)
    assert codes(g) == ["GG101"]
    assert g.findings[0].step == 2
    assert g.findings[0].params == ALL


# -- GG102 cleared-before-step ------------------------------------------------


@pytest.mark.parametrize(
    ("clear", "first"),
    [
        pytest.param(lambda net, opt: opt.zero_grad(), 1, id="optimizer.zero_grad"),
        pytest.param(lambda net, opt: opt.zero_grad(set_to_none=False), 1, id="set_to_none=False"),
        pytest.param(lambda net, opt: net.zero_grad(), 1, id="model.zero_grad"),
        # No wrapper sees these; their zeros are also what nan_to_num_ leaves
        # of a NaN backward, so the first one arms the probe that tells them apart.
        pytest.param(
            lambda net, opt: net.zero_grad(set_to_none=False), 2, id="model.zero_grad-in-place"
        ),
        pytest.param(
            lambda net, opt: [setattr(p, "grad", None) for p in net.parameters()],
            1,
            id="p.grad=None",
        ),
        pytest.param(
            lambda net, opt: [p.grad.zero_() for p in net.parameters()], 2, id="p.grad.zero_"
        ),
    ],
)
def test_clearing_between_backward_and_step_applies_nothing(net, clear, first):
    """The tutorial's backward / clear / step order is GG102 on every parameter."""

    def loop(net, opt):
        for b in batches():
            loss_of(net, b).backward()
            clear(net, opt)
            opt.step()

    g = run(loop, net)
    assert codes(g) == ["GG102"]
    (f,) = g.findings
    assert f.step == first
    assert f.params == ALL
    assert g.counts[f] == 6 - (first - 1)
    assert "Fix: move zero_grad() before loss.backward()" in f.message


def test_clearing_a_submodule_between_backward_and_step_names_it(net):
    """Clearing only the head between backward and step names only the head."""

    def loop(net, opt):
        for b in batches():
            opt.zero_grad()
            loss_of(net, b).backward()
            net.head.zero_grad()
            opt.step()

    g = run(loop, net)
    assert codes(g) == ["GG102"]
    assert g.findings[0].params == HEAD


def test_clearing_a_submodule_in_place_between_backward_and_step_names_it(net):
    """An in-place clear of the encoder alone is recognised when nothing else changed."""

    def loop(net, opt):
        for b in batches():
            opt.zero_grad()
            loss_of(net, b).backward()
            net.encoder.zero_grad(set_to_none=False)
            opt.step()

    g = run(loop, net)
    assert codes(g) == ["GG102"]
    assert g.findings[0].params == ENCODER


def test_strict_mode_raises_at_the_step_with_the_finding(net):
    """Strict mode raises a GradGuardError subclass carrying the finding at the step."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with gradguard.guarding(opt, model=net, mode="strict"):
        loss_of(net, batches(1)[0]).backward()
        opt.zero_grad()
        with pytest.raises(gradguard.ClearedBeforeStepError) as info:
            opt.step()
    assert isinstance(info.value, gradguard.GradGuardError)
    assert isinstance(info.value, RuntimeError)
    assert info.value.finding is not None
    assert info.value.finding.code == "GG102"
    assert info.value.finding.params == ALL
    assert str(info.value).startswith("GG102 cleared-before-step:")


def test_warn_mode_warns_once_per_place_and_points_at_the_users_line(net):
    """Warn mode emits one GradGuardWarning per place, attributed to the step's line."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1)

    def loop() -> None:
        for b in batches():
            loss_of(net, b).backward()
            opt.zero_grad()
            opt.step()

    with (
        gradguard.guarding(opt, model=net),
        pytest.warns(gradguard.ClearedBeforeStepWarning) as record,
    ):
        loop()
    assert len(record) == 1
    assert record[0].filename == __file__
    assert isinstance(record[0].message, gradguard.GradGuardWarning)
    assert record[0].message.finding.code == "GG102"


def test_ignore_silences_a_code(net):
    """``ignore=`` silences the named codes and nothing else."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with gradguard.guarding(opt, model=net, mode="strict", ignore=["GG102"]) as g:
        for b in batches():
            loss_of(net, b).backward()
            opt.zero_grad()
            opt.step()
    assert g.findings == []


# -- GG103 step-without-backward ------------------------------------------------


def test_step_before_backward_is_gg103_then_gg102(net):
    """A zero_grad / step / backward loop steps on nothing first, then discards."""

    def loop(net, opt):
        for b in batches():
            opt.zero_grad()
            opt.step()
            loss_of(net, b).backward()

    g = run(loop, net)
    assert codes(g) == ["GG103", "GG102"]
    assert g.findings[0].step == 1
    assert g.findings[0].params == ALL
    assert g.findings[1].step == 2
    assert g.findings[1].params == ALL


def test_step_left_in_a_no_grad_validation_loop_is_gg103(net):
    """A step under no_grad after the gradients were cleared applies nothing."""

    def loop(net, opt):
        for b in batches(2):
            opt.zero_grad()
            loss_of(net, b).backward()
            opt.step()
        opt.zero_grad()
        with torch.no_grad():
            for b in batches(2):
                loss_of(net, b)
                opt.step()

    g = run(loop, net)
    assert codes(g) == ["GG103"]
    assert g.findings[0].step == 3
    assert g.findings[0].params == ALL


def test_step_in_validation_with_gradients_left_over_is_stale(net):
    """Left-over gradients re-applied by a validation step are GG101, not GG103."""

    def loop(net, opt):
        opt.zero_grad()
        loss_of(net, batches(1)[0]).backward()
        opt.step()
        with torch.no_grad():
            loss_of(net, batches(1)[0])
            opt.step()

    g = run(loop, net)
    assert codes(g) == ["GG101"]
    assert g.findings[0].params == ALL


def test_names_fall_back_to_group_index_and_shape_without_a_model():
    """Parameters no module owns are named by group, index and shape."""
    w = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.SGD([w], lr=0.1)
    with gradguard.guarding(opt, mode="log") as g:
        (w**2).sum().backward()
        opt.zero_grad()
        opt.step()
    assert g.findings[0].params == ("group0.param0[3x2]",)


def test_names_are_found_without_model_argument(net):
    """Without ``model=``, the owning module is found when the first finding fires."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with gradguard.guarding(opt, mode="log") as g:
        loss_of(net, batches(1)[0]).backward()
        opt.zero_grad()
        opt.step()
    assert g.findings[0].params == ALL


# -- steps given a closure -------------------------------------------------------


def test_missing_zero_grad_is_found_when_step_takes_a_closure(net):
    """A step given a closure (Lightning passes one to every step) is judged as it returns."""

    def loop(net, opt):
        for b in batches():
            loss_of(net, b).backward()
            opt.step(lambda: None)

    g = run(loop, net)
    assert codes(g) == ["GG101"]
    assert g.findings[0].step == 2
    assert g.findings[0].params == ALL


def test_clearing_before_a_closure_step_is_found_and_strict_raises_after_it(net):
    """A clear between backward and step(closure) is GG102; strict mode raises once the step ran."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    before = [p.detach().clone() for p in net.parameters()]
    with gradguard.guarding(opt, mode="strict"):
        loss_of(net, batches(1)[0]).backward()
        opt.zero_grad()
        with pytest.raises(gradguard.ClearedBeforeStepError):
            opt.step(lambda: None)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
