"""Parameters that change under a guard (unfrozen, swapped, replaced) stay watched."""

from __future__ import annotations

import gc

import torch
from conftest import ENCODER, Net, batches, codes, loss_of

import gradguard


def stale_steps(net: Net, opt: torch.optim.Optimizer, n: int = 3) -> None:
    """Backward and step ``n`` times without clearing: GG101 from the second step."""
    for b in batches(n):
        loss_of(net, b).backward()
        opt.step()


def test_a_parameter_unfrozen_after_some_steps_is_watched(net):
    """A parameter frozen when the guard started is hooked once it requires grad."""
    for p in net.encoder.parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with gradguard.guarding(opt, model=net, mode="log") as g:
        for b in batches(2):
            opt.zero_grad()
            loss_of(net, b).backward()
            opt.step()
        for p in net.encoder.parameters():
            p.requires_grad_(True)
        opt.zero_grad()
        stale_steps(net, opt)
    assert codes(g) == ["GG101"]
    assert set(ENCODER) <= set(g.findings[0].params)


def test_a_parameter_swapped_into_a_group_in_place_is_watched(net):
    """Replacing an entry of a group's list in place is noticed at the next step."""
    opt = torch.optim.SGD(net.head.parameters(), lr=0.1)
    with gradguard.guarding(opt, model=net, mode="log") as g:
        opt.zero_grad()
        loss_of(net, batches(1)[0]).backward()
        opt.step()
        opt.param_groups[0]["params"][:] = list(net.encoder.parameters())
        opt.zero_grad()
        stale_steps(net, opt)
    assert codes(g) == ["GG101"]
    assert g.findings[0].params == ENCODER


def test_a_new_model_after_the_old_one_died_is_watched(device_results):
    """Parameters whose ids may reuse dead ones' are tracked as the new objects they are.

    gradguard holds parameters weakly: a finding still waiting for the device
    when its parameters die goes with them. At close, that is every model's but
    the last one's; 3 steps late, each model's three steps are all still waiting.
    """
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    with gradguard.guarding(opt, mode="log") as g:
        for seed in range(3):
            torch.manual_seed(seed)
            net = Net()
            opt.param_groups[0]["params"] = list(net.parameters())
            opt.zero_grad()
            stale_steps(net, opt)
            del net
            gc.collect()
    assert codes(g) == ["GG101"]
    assert sum(g.counts.values()) == (6 if device_results in ("eager", "late-1") else 2)
