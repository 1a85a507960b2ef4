"""Run a training scenario unguarded and guarded, to compare what gradguard changed and found.

A scenario is a function taking ``wrap(optimizer, model=None)``, which it calls
on every optimizer it builds, and returning the trained parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog
import torch
from torch import nn

import gradguard

Wrap = Callable[..., torch.optim.Optimizer]
"""What a scenario calls on each optimizer it builds: ``wrap(opt, model=None)``."""


class Guards:
    """Guards every optimizer a scenario builds, and remembers them to check and close."""

    def __init__(self, mode: str, **options: Any) -> None:
        self.mode = mode
        self.options = options
        self.guards: list[gradguard.Guard] = []
        self.fired: list[gradguard.Finding] = []

    def __call__(self, opt: torch.optim.Optimizer, model: nn.Module | None = None):
        gradguard.guard(opt, model=model, mode=self.mode, **self.options)
        g = gradguard.guard_of(opt)
        assert g is not None
        g._reporter.listeners.append(self.fired.append)
        self.guards.append(g)
        return opt

    def close(self) -> None:
        for g in self.guards:
            g.close()


def plain(opt: torch.optim.Optimizer, model: nn.Module | None = None) -> torch.optim.Optimizer:
    """The unguarded run: the optimizer as built."""
    return opt


def assert_silent_and_identical(scenario: Callable[[Wrap], list[torch.Tensor]], **options):
    """Run ``scenario`` unguarded, then guarded in strict mode: no finding, same weights."""
    expected = scenario(plain)
    guards = Guards("strict", **options)
    try:
        got = scenario(guards)
    finally:
        guards.close()
    assert [f.message for f in guards.fired] == []
    assert not any(g._failed for g in guards.guards), "the guard switched itself off"
    assert len(expected) == len(got)
    for a, b in zip(expected, got, strict=True):
        assert a.dtype == b.dtype
        assert torch.equal(a, b), "guarded training differs from unguarded"


def findings(scenario: Callable[[Wrap], Any], **options) -> list[tuple[str, int, tuple[str, ...]]]:
    """Run ``scenario`` guarded in log mode; every finding as ``(code, step, params)``, by step."""
    guards = Guards("log", **options)
    with structlog.testing.capture_logs() as logs:
        try:
            scenario(guards)
        finally:
            guards.close()
    assert not [e for e in logs if e["event"] == "internal-error"]
    # In the order of the steps they are about: a result judged late (a device
    # running behind) is reported after later steps' findings.
    fired = sorted(guards.fired, key=lambda f: f.step)
    return [(f.code, f.step, f.params) for f in fired]
