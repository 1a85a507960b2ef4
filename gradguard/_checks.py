"""Pure step-time judgement: slot states in, parameters per verdict out.

Nothing here logs, warns or raises; `_guard` turns verdicts into findings.

Staleness is judged when a step consumes the gradient, never when backward
writes it: a GAN's generator backward writes into the discriminator's already
applied gradients, and that is fine as long as they are cleared before the
discriminator's next step.
"""

from __future__ import annotations

import dataclasses

import torch

from gradguard._tracker import Slot


@dataclasses.dataclass
class StepVerdict:
    """What a step is about to apply, sorted by what went wrong.

    Attributes:
        stale: accumulated onto a gradient a previous step applied (GG101).
        stale_changed: stale, then changed in place: clipped (still GG101) or
            zeroed by a clear gradguard did not see (GG102).
        cleared: backward's gradient was cleared before this step (GG102).
        changed: fresh gradients changed in place since backward, by a clip or
            by a clear gradguard did not see; zero ones mean GG102.
        reapplied: the gradient the previous step applied, untouched (GG101
            when nothing fresh is stepped).
        reapplied_changed: the previous step's gradient object, changed in
            place since (clipped again: GG101; zeroed: nothing to apply).
        any_fresh: some trainable parameter holds a gradient from a backward
            since the last step.
        trainable: the optimizer holds at least one parameter that requires grad.
    """

    stale: list[torch.Tensor] = dataclasses.field(default_factory=list)
    stale_changed: list[torch.Tensor] = dataclasses.field(default_factory=list)
    cleared: list[torch.Tensor] = dataclasses.field(default_factory=list)
    changed: list[torch.Tensor] = dataclasses.field(default_factory=list)
    reapplied: list[torch.Tensor] = dataclasses.field(default_factory=list)
    reapplied_changed: list[torch.Tensor] = dataclasses.field(default_factory=list)
    any_fresh: bool = False
    trainable: bool = False

    @property
    def nothing_to_apply(self) -> bool:
        """No fresh gradient, and no stale or cleared one to blame instead (GG103)."""
        return (
            self.trainable
            and not self.any_fresh
            and not (self.stale or self.cleared or self.reapplied or self.reapplied_changed)
            and not self.stale_changed
        )


def judge_step(entries: list[tuple[torch.Tensor, Slot]]) -> StepVerdict:
    """Sort the parameters a step is about to apply into a `StepVerdict`."""
    verdict = StepVerdict()
    trainable = any_fresh = False
    for param, slot in entries:
        if not param.requires_grad:
            continue  # frozen: the optimizer skips or merely decays it
        trainable = True
        grad = param.grad
        if slot.fresh:
            # The usual case, decided inline because this runs per parameter
            # at every step: backward's gradient, untouched since.
            ref = slot.ref
            if (
                grad is not None
                and not slot.stale
                and ref is not None
                and ref() is grad
                and grad._version == slot.version
            ):
                any_fresh = True
                continue
            _judge_fresh(verdict, param, slot, grad)
        elif slot.discarded:
            verdict.cleared.append(param)
        elif grad is not None:
            _judge_unchanged(verdict, param, slot, grad)
    verdict.trainable = trainable
    verdict.any_fresh = verdict.any_fresh or any_fresh
    return verdict


def _judge_fresh(
    verdict: StepVerdict, param: torch.Tensor, slot: Slot, grad: torch.Tensor | None
) -> None:
    if grad is None:
        verdict.cleared.append(param)  # set to None after backward
        return
    verdict.any_fresh = True
    if slot.holds(grad) or grad.is_sparse:
        if slot.stale:
            verdict.stale.append(param)
    elif slot.stale:
        verdict.stale_changed.append(param)
    else:
        verdict.changed.append(param)


def _judge_unchanged(
    verdict: StepVerdict, param: torch.Tensor, slot: Slot, grad: torch.Tensor
) -> None:
    ref = slot.ref
    if ref is None or ref() is not grad:
        # Assigned by hand (torch.func, a custom loop): a gradient we did not
        # see being made, so not one we can call stale.
        verdict.any_fresh = True
    elif slot.applied:
        if grad._version == slot.version:
            verdict.reapplied.append(param)
        elif not grad.is_sparse:
            verdict.reapplied_changed.append(param)
