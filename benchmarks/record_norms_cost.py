"""What record_norms costs per step on a small MLP, against the same guard without it.

    python benchmarks/record_norms_cost.py [--rounds 21] [--steps 150]

The workload: 4 x Linear(512, 512) with ReLU, batch 128, AdamW, one CPU
thread. Both variants run under gradguard.install(mode="log", log_json=...),
so the only difference is record_norms. Rounds alternate the two variants
(in a shuffled order) so that load from other processes hits both alike; the
result is the median over rounds. Time is the thread's CPU time: with one
torch thread every op runs on it, and time spent waiting for a shared core
is left out.

A difference of about 1% is below what end-to-end rounds resolve on a busy
machine, so the cost is also measured by its parts: how many norm passes
each variant ran, what one pass costs, and what writing one step's record
costs on the host.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import gradguard
from gradguard import _health, _judge

PASSES = {False: 0, True: 0}


def mlp() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(4):
        layers += [nn.Linear(512, 512), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    x, y = torch.randn(128, 512), torch.randn(128, 512)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def seconds_per_step(record_norms: bool, steps: int, warmup: int, log: str) -> float:
    """Train for ``warmup + steps`` steps; the mean CPU time of the last ``steps``."""
    model, opt = mlp()
    gradguard.install(mode="log", log_json=log, record_norms=record_norms)
    try:
        gradguard.guard(opt, model=model)
        train(model, opt, warmup)
        counted = count_passes(record_norms)
        start = time.thread_time()
        train(model, opt, steps)
        elapsed = time.thread_time() - start
        counted()
        return elapsed / steps
    finally:
        gradguard.uninstall()


def count_passes(record_norms: bool) -> Callable[[], None]:
    """Count the norm passes until the returned function is called."""
    original = _judge.grad_norms

    def counting(*args: Any) -> Any:
        PASSES[record_norms] += 1
        return original(*args)

    _judge.grad_norms = counting

    def stop() -> None:
        _judge.grad_norms = original

    return stop


def part_costs(log: str, calls: int = 2000) -> tuple[float, float]:
    """Seconds of one norm pass over the MLP's gradients, and of writing one step's record."""
    model, opt = mlp()
    gradguard.install(mode="log", log_json=log, record_norms=True)
    try:
        guard = gradguard.guard_of(gradguard.guard(opt, model=model))
        assert guard is not None
        train(model, opt, 3)
        params = list(model.parameters())
        passes = []
        for _ in range(200):
            start = time.thread_time()
            _health.grad_norms(params, None, None)
            passes.append(time.thread_time() - start)
        norms = [0.5] * len(params)
        start = time.thread_time()
        for _ in range(calls):
            guard._judge._record_norms(list(params), norms, 7)
        return statistics.median(passes), (time.thread_time() - start) / calls
    finally:
        gradguard.uninstall()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=25)
    args = parser.parse_args()
    torch.set_num_threads(1)
    times: dict[bool, list[float]] = {False: [], True: []}
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "run.jsonl")
        for _ in range(args.rounds):
            order = [False, True]
            random.shuffle(order)
            got = {v: seconds_per_step(v, args.steps, args.warmup, log) for v in order}
            for v, t in got.items():
                times[v].append(t)
            ratios.append(got[True] / got[False])
        one_pass, one_record = part_costs(log)
    off, on = statistics.median(times[False]), statistics.median(times[True])
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    measured = args.rounds * args.steps
    extra_passes = (PASSES[True] - PASSES[False]) / measured
    by_parts = extra_passes * one_pass + one_record
    print(f"end to end, median of {args.rounds} interleaved rounds of {args.steps} steps:")
    print(f"  record_norms off {off * 1e3:.2f} ms/step, on {on * 1e3:.2f} ms/step")
    print(f"  ratio on/off {statistics.median(ratios):.3f} (quartiles {q1:.3f}-{q3:.3f})")
    print("by parts:")
    print(
        f"  norm passes per step: off {PASSES[False] / measured:.2f}, "
        f"on {PASSES[True] / measured:.2f}; one pass {one_pass * 1e6:.0f} us"
    )
    print(f"  writing one step's record: {one_record * 1e6:.1f} us")
    print(f"  cost {by_parts * 1e6:.0f} us/step = {by_parts / off:.1%} of a step")


if __name__ == "__main__":
    main()
