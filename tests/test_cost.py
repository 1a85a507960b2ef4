"""What gradguard adds to a step, counted (never timed): host-device syncs and tensor ops.

Counts come from the benchmark's ``OpCounter`` (a ``TorchDispatchMode``) over
real training steps, as differences between a guarded loop and the same loop
unguarded on an identical model: AdamW itself reads its step counters with
``.item()``, so raw counts are not gradguard's.
"""

from __future__ import annotations

import copy
import functools
import gc
import importlib.util
import sys
import types
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradguard
from gradguard._health import LATENESS

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "overhead.py"
_SPEC = importlib.util.spec_from_file_location("gradguard_overhead_benchmark", _PATH)
assert _SPEC is not None
assert _SPEC.loader is not None
overhead = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = overhead  # dataclasses look their module up by name
_SPEC.loader.exec_module(overhead)

WARMUP = 2  # a missing zero_grad is stale from the second step on
COUNTED = 1  # counts are exact; one step is enough


@functools.cache
def _prototype(tensors: int) -> nn.Module:
    torch.manual_seed(0)
    model: nn.Module = overhead.Chain(depth=tensors // 2, width=4)
    return model


def chain(tensors: int) -> nn.Module:
    """Linear(4, 4) layers in sequence, ``tensors`` parameter tensors in all.

    The benchmark's orthogonal chain: no gradient vanishes to exact zeros,
    which gradguard could not tell from a clear.
    """
    return copy.deepcopy(_prototype(tensors))


Loop = Callable[[nn.Module, torch.optim.Optimizer, torch.Tensor], None]


def correct(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    """The canonical step."""
    opt.zero_grad()
    F.mse_loss(model(x), x).backward()
    opt.step()


def clipped(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    """Clipping changes gradients in place after backward: gradguard asks the device."""
    opt.zero_grad()
    F.mse_loss(model(x), x).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    opt.step()


def no_zero_grad(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    """The bug: nothing clears, so GG101 fires at every step."""
    F.mse_loss(model(x), x).backward()
    opt.step()


def clipped_no_zero_grad(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    """Stale and clipped: one device-side flag per parameter tells clip from clear."""
    F.mse_loss(model(x), x).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    opt.step()


LOOPS: dict[str, Loop] = {
    "correct": correct,
    "clipped": clipped,
    "no_zero_grad": no_zero_grad,
    "clipped_no_zero_grad": clipped_no_zero_grad,
}
BUGGY = {"no_zero_grad", "clipped_no_zero_grad"}


@functools.cache
def counts(
    loop: str, tensors: int, mode: str | None, late: tuple[int, bool] = (0, False)
) -> tuple[float, float, int]:
    """Ops and syncs per step of ``loop`` on a ``tensors``-tensor model, guarded in ``mode``.

    Also returns how many times a finding fired. ``late`` is `LATENESS` at the
    call: the cache must tell the device-result modes apart.
    """
    model = chain(tensors)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = None
    if mode is not None:
        # Strict mode would raise at the buggy step and skip it, leaving nothing to
        # compare; ignoring the code still runs every check and only mutes the raise.
        ignore = ["GG101"] if mode == "strict" and loop in BUGGY else None
        gradguard.guard(opt, model=model, mode=mode, ignore=ignore)
        g = gradguard.guard_of(opt)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))

    def step() -> None:
        LOOPS[loop](model, opt, x)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(WARMUP):
            step()
        ops, syncs, _ = overhead.count_per_step(step, COUNTED)
        if g is not None:
            g.settle()  # device results still pending are about the counted steps
    assert [type(w.message) for w in caught] == (
        [gradguard.StaleGradientWarning] if mode == "warn" and loop in BUGGY else []
    )
    fired = 0
    if g is not None:
        assert not g.closed, "gradguard failed internally while being counted"
        fired = sum(g.counts.values())
        gradguard.unguard(opt)
    return ops, syncs, fired


def extra(loop: str, tensors: int, mode: str) -> tuple[float, float, int]:
    """gradguard's own ops and syncs per step (guarded minus unguarded), and its findings."""
    late = (LATENESS.steps, LATENESS.until_close)
    plain_ops, plain_syncs, _ = counts(loop, tensors, None, late)
    ops, syncs, fired = counts(loop, tensors, mode, late)
    return ops - plain_ops, syncs - plain_syncs, fired


@pytest.mark.parametrize("loop", list(LOOPS))
@pytest.mark.parametrize("mode", ["log", "warn"])
def test_no_sync_in_warn_and_log_mode(loop, mode):
    """In warn and log mode gradguard adds no host-device sync to any step."""
    _, syncs, fired = extra(loop, 10, mode)
    assert syncs == 0
    if loop in BUGGY:  # the finding really fired at every step but the first
        assert fired == WARMUP + COUNTED - 1


@pytest.mark.parametrize("loop", list(LOOPS))
def test_at_most_one_sync_per_step_in_strict_mode(loop):
    """Strict mode reads a device-side verdict at the step: at most one sync."""
    _, syncs, _ = extra(loop, 10, "strict")
    assert syncs <= 1


@pytest.mark.parametrize("loop", list(LOOPS))
@pytest.mark.parametrize("mode", ["log", "warn", "strict"])
def test_ops_per_step_do_not_grow_with_the_parameter_count(loop, mode, device_results):
    """gradguard dispatches as many tensor ops per step for 200 parameter tensors as for 10."""
    small, _, _ = extra(loop, 10, mode)
    large, _, _ = extra(loop, 200, mode)
    assert small == large
    # The numeric checks: one batched norm pass (foreach_norm, stack). A loop that
    # clips also gets a second norm pass where its backward ends, before the clip
    # (what GG202 judges there); the zero check that tells its clip from a clear
    # reads the step's norm pass. With the zero check's answer still on the device
    # at the next backward (CUDA), that backward reads the probe.
    clip_ops = NORM_PASS_OPS if "clipped" in loop else 0
    if "clipped" in loop and device_results != "eager" and mode != "strict":
        clip_ops += PROBE_OPS
    assert 0 < small <= NORM_PASS_OPS + clip_ops


NORM_PASS_OPS = 2  # the not-skipped flag is appended on the host
# FiniteProbe: is one small gradient finite (abs, ne, eq, mul, all), its reading made a
# vector (view) to be read back on its own.
PROBE_OPS = 6


def test_a_correct_step_dispatches_no_op_without_the_numeric_checks():
    """With check_numerics=False a correct step costs gradguard no tensor op at all."""
    model = chain(10)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    plain, _, _ = counts("correct", 10, None)
    with gradguard.guarding(opt, model=model, mode="log", check_numerics=False):
        for _ in range(WARMUP):
            correct(model, opt, x)
        ops, syncs, _ = overhead.count_per_step(lambda: correct(model, opt, x), COUNTED)
    assert ops == plain
    assert syncs == counts("correct", 10, None)[1]


def test_the_counter_sees_syncs_and_in_place_foreach_changes():
    """The counter counts ``.item()`` and keeps foreach ops' version bumps, as outside it."""
    t = torch.ones(3)
    with overhead.OpCounter() as counter:
        t.sum().item()
        torch._foreach_mul_([t], 2.0)
    assert counter.syncs == 1
    assert t._version == 1


@pytest.mark.cuda
@pytest.mark.parametrize("loop", list(LOOPS))
def test_no_cuda_sync_in_log_mode(loop):
    """On CUDA, a guarded step runs under ``set_sync_debug_mode("error")`` without error."""
    torch.manual_seed(0)
    model = chain(10).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(8, 4, device="cuda")
    with gradguard.guarding(opt, model=model, mode="log"):
        for _ in range(WARMUP):
            LOOPS[loop](model, opt, x)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            LOOPS[loop](model, opt, x)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("framework", ["pytorch_lightning", "transformers.trainer"])
def test_guarding_never_scans_the_heap_when_a_framework_is_imported(monkeypatch, framework):
    """A program that imported Lightning or transformers pays no walk over every live object.

    Such a walk takes ~0.1 s in a large process, at every guard created: a
    test suite that guards hundreds of optimizers would crawl.
    """
    monkeypatch.setitem(
        sys.modules, framework, sys.modules.get(framework) or types.ModuleType(framework)
    )

    def scan(*objs: object) -> list[object]:
        raise AssertionError("gc.get_referrers walked the heap")

    monkeypatch.setattr(gc, "get_referrers", scan)
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradguard.guarding(opt, model=model, mode="strict") as g:
        model(torch.ones(1, 2)).sum().backward()
        opt.step()
    assert g.options.accumulation_steps is None
    assert g.findings == []


def test_the_trainer_workload_is_skipped_without_transformers(monkeypatch, capsys):
    """Without transformers the benchmark says it skips the Trainer workload, and succeeds."""
    monkeypatch.setitem(sys.modules, "transformers", None)  # what find_spec sees: not there
    threads = torch.get_num_threads()
    try:
        assert overhead.main(["--workloads", "trainer", "--quick"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert "trainer: skipped, transformers not installed" in capsys.readouterr().err


# -- Python work per step, counted with sys.settrace --------------------------

_PACKAGE = str(Path(gradguard.__file__).resolve().parent)
# Budgets on a correct loop: per parameter tensor per step, and per step besides.
CALLS_PER_TENSOR = 1.2
LINES_PER_TENSOR = 15
CALLS_PER_STEP = 40


def python_work(
    tensors: int, steps: int = 3, frozen: int = 0, loop: Loop = correct
) -> tuple[float, float]:
    """gradguard's Python calls and lines per step on the correct loop, counted by settrace.

    Only frames of gradguard's own files count: torch's and the loop's do not.
    ``frozen``: that many of the first parameter tensors do not require grad.
    """
    model = chain(tensors)
    for param in list(model.parameters())[:frozen]:
        param.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    calls = lines = 0

    def tracer(frame: types.FrameType, event: str, arg: object) -> Callable[..., object] | None:
        nonlocal calls, lines
        if not frame.f_code.co_filename.startswith(_PACKAGE):
            return None
        if event == "call":
            calls += 1
        elif event == "line":
            lines += 1
        return tracer

    with gradguard.guarding(opt, model=model) as g:
        for _ in range(WARMUP):
            correct(model, opt, x)
        sys.settrace(tracer)
        try:
            for _ in range(steps):
                loop(model, opt, x)
        finally:
            sys.settrace(None)
        assert g.findings == []
    return calls / steps, lines / steps


def test_python_work_per_step_stays_within_budget(device_results):
    """A correct step costs at most 1.2 calls and 15 lines per tensor, and 40 calls besides."""
    small_calls, small_lines = python_work(10)
    large_calls, large_lines = python_work(210)
    calls_per_tensor = (large_calls - small_calls) / 200
    lines_per_tensor = (large_lines - small_lines) / 200
    assert calls_per_tensor <= CALLS_PER_TENSOR
    assert lines_per_tensor <= LINES_PER_TENSOR
    if device_results == "eager":  # later results add a queue and the step's location
        assert small_calls - 10 * calls_per_tensor <= CALLS_PER_STEP


# A loop that clips: its zero check's answer is judged per tensor too; an answer left
# for a later step adds what is pending about each gradient until it comes.
CLIPPED_LINES_PER_TENSOR = 25
CLIPPED_LINES_PER_TENSOR_LATE = 30


def test_a_clipped_step_costs_one_call_per_tensor(device_results):
    """A clipped step (the Trainer's, nanoGPT's) is sorted at C speed too: one call and at
    most 25 lines per tensor, the post-accumulate hook and the zero check's answer."""
    small_calls, small_lines = python_work(10, loop=clipped)
    large_calls, large_lines = python_work(210, loop=clipped)
    assert (large_calls - small_calls) / 200 <= CALLS_PER_TENSOR
    late = device_results != "eager"
    budget = CLIPPED_LINES_PER_TENSOR_LATE if late else CLIPPED_LINES_PER_TENSOR
    assert (large_lines - small_lines) / 200 <= budget


def test_frozen_parameters_cost_almost_no_python_work():
    """Frozen tensors without gradients (fine-tuning) cost no call and 2 lines each."""
    calls, lines = python_work(210, frozen=200)
    fewer_calls, fewer_lines = python_work(110, frozen=100)
    assert calls == fewer_calls
    assert (lines - fewer_lines) / 100 <= 2  # `zero_grad` forgets each one's gradient


def test_python_work_counter_sees_the_per_tensor_path(monkeypatch):
    """With every step taken for unusual, gradguard's per-tensor Python loops show in the count."""
    monkeypatch.setattr("gradguard._checks.usual_step", lambda params, slots: None)
    lines_per_tensor = (python_work(110)[1] - python_work(10)[1]) / 100
    assert lines_per_tensor > LINES_PER_TENSOR


def accumulated(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    """Two micro-batches per step: every step is judged for foreign gradients (GG106)."""
    opt.zero_grad()
    for half in x.chunk(2):
        F.mse_loss(model(half), half).backward()
    opt.step()


# Per tensor: two post-accumulate hooks, the second taking the accumulating path (one
# call more); the step is sorted, and judged for GG106, at C speed.
ACCUMULATED_CALLS_PER_TENSOR = 3.2
ACCUMULATED_LINES_PER_TENSOR = 35


def test_an_accumulating_step_is_judged_for_foreign_gradients_at_c_speed():
    """Judging a window of two passes for GG106 adds no Python work per tensor beyond the
    second backward's hook."""
    small_calls, small_lines = python_work(10, loop=accumulated)
    large_calls, large_lines = python_work(210, loop=accumulated)
    assert (large_calls - small_calls) / 200 <= ACCUMULATED_CALLS_PER_TENSOR
    assert (large_lines - small_lines) / 200 <= ACCUMULATED_LINES_PER_TENSOR
