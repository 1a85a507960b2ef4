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

from gradguard._sharded import version_of
from gradguard._tracker import Slot, Split, usual_step

_TENSOR = torch.Tensor


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
        reapplied_changed: a frozen parameter's gradient the previous step
            applied, changed in place since (clipped again: GG101; zeroed:
            nothing to apply).
        rewritten: gradients written in place since the last step or clear
            with no backward (``p.grad.copy_(g)``, a clear no wrapper sees):
            nonzero ones are new content written by hand; zeros apply nothing.
        assigned: gradients assigned since the last step or clear with no
            backward (``p.grad = g``: torch.func, per-sample gradients, master
            weights): new content written by hand, unless zero.
        maybe_zero: gradients changed in place whose zeros only matter for
            what the step applies (a frozen parameter's fresh gradient, a
            cleared one written since): zeroed ones are not stale later.
        any_fresh: some trainable parameter holds a gradient from a backward
            since the last step.
        trainable: the optimizer holds at least one parameter that requires grad.
        fresh: trainable parameters holding backward output from since the last step.
        with_grad: trainable parameters with a gradient, dense or sparse (what the
            step applies).
        lost: parameters whose backward results a clear threw away before this step.
        lost_micro_batches: the most backward passes any parameter lost that way.
        micro_batches: the most backward passes any parameter saw since the last step.
        usual: every trainable parameter holds backward's gradient, untouched
            since, on nothing applied before, and no frozen one holds a
            gradient (`usual_step`): nothing but ``fresh`` to judge. Its
            parameters and slots, trainable then frozen; ``None`` otherwise.
        rescaled: the same, but for gradients changed in place since backward
            (``changed``: a clip, or a clear no wrapper sees); the step is
            judged by `RULES` like any other, only sorted at C speed.
    """

    stale: list[torch.Tensor] = dataclasses.field(default_factory=list)
    stale_changed: list[torch.Tensor] = dataclasses.field(default_factory=list)
    cleared: list[torch.Tensor] = dataclasses.field(default_factory=list)
    changed: list[torch.Tensor] = dataclasses.field(default_factory=list)
    reapplied: list[torch.Tensor] = dataclasses.field(default_factory=list)
    reapplied_changed: list[torch.Tensor] = dataclasses.field(default_factory=list)
    rewritten: list[torch.Tensor] = dataclasses.field(default_factory=list)
    assigned: list[torch.Tensor] = dataclasses.field(default_factory=list)
    maybe_zero: list[torch.Tensor] = dataclasses.field(default_factory=list)
    any_fresh: bool = False
    trainable: bool = False
    fresh: list[torch.Tensor] = dataclasses.field(default_factory=list)
    with_grad: list[torch.Tensor] = dataclasses.field(default_factory=list)
    lost: list[torch.Tensor] = dataclasses.field(default_factory=list)
    lost_micro_batches: int = 0
    micro_batches: int = 0
    usual: Split | None = None
    rescaled: Split | None = None

    @property
    def nothing_to_apply(self) -> bool:
        """No fresh gradient, and no stale or cleared one to blame instead (GG103)."""
        return (
            self.trainable
            and not self.any_fresh
            and not (self.stale or self.cleared or self.reapplied or self.reapplied_changed)
            and not (self.stale_changed or self.rewritten or self.assigned)
        )

    @property
    def nothing_new(self) -> bool:
        """No gradient a backward or the user produced since the last step, as far as known."""
        return self.trainable and not self.any_fresh and not self.assigned


def judge_step(
    entries: list[tuple[torch.Tensor, Slot]], params: list[torch.Tensor], slots: list[Slot]
) -> StepVerdict:
    """Sort the parameters a step is about to apply into a `StepVerdict`.

    ``params`` and ``slots`` are the entries' two halves, in order.
    """
    usual = usual_step(params, slots)
    if usual is not None:  # decided at C speed
        parts, micro, changed = usual
        applied = list(parts[0])
        return StepVerdict(
            changed=changed,
            any_fresh=True,
            trainable=True,
            fresh=applied,
            with_grad=applied[:],
            micro_batches=micro,
            usual=None if changed else parts,
            rescaled=parts if changed else None,
        )
    verdict = StepVerdict()
    # This runs per parameter at every step: the usual case is decided
    # inline, with the lists' append methods bound once.
    with_grad = verdict.with_grad.append
    fresh_ones = verdict.fresh.append
    trainable = any_fresh = False
    micro = 0
    for param, slot in entries:
        grad = param.grad
        if not param.requires_grad:
            if grad is not None and not grad.is_sparse:
                _judge_frozen(verdict, param, slot, grad)
            continue
        trainable = True
        if grad is not None:
            with_grad(param)
        if slot.lost:
            verdict.lost.append(param)
            verdict.lost_micro_batches = max(verdict.lost_micro_batches, slot.lost)
        fresh = slot.fresh
        if fresh:
            if fresh > micro:
                micro = fresh
            # Backward's gradient, untouched since.
            ref = slot.ref
            if (
                grad is not None
                and not slot.stale
                and ref is not None
                and ref() is grad
                # version_of, inline: this runs per parameter at every step.
                and (grad._version if type(grad) is _TENSOR else version_of(grad)) == slot.version
            ):
                any_fresh = True
                fresh_ones(param)
                continue
            _judge_fresh(verdict, param, slot, grad)
        elif slot.discarded:
            verdict.cleared.append(param)
            if grad is not None and not grad.is_sparse and not slot.holds(grad):
                verdict.maybe_zero.append(param)  # clipped zeros, or written since
        elif grad is not None:
            _judge_unchanged(verdict, param, slot, grad, trainable=True)
    verdict.trainable = trainable
    verdict.any_fresh = verdict.any_fresh or any_fresh
    verdict.micro_batches = micro
    return verdict


def _judge_fresh(
    verdict: StepVerdict, param: torch.Tensor, slot: Slot, grad: torch.Tensor | None
) -> None:
    if grad is None:
        verdict.cleared.append(param)  # set to None after backward
        return
    verdict.any_fresh = True
    verdict.fresh.append(param)
    if slot.holds(grad) or grad.is_sparse:
        if slot.stale:
            verdict.stale.append(param)
    elif slot.stale:
        verdict.stale_changed.append(param)
    else:
        verdict.changed.append(param)


def _judge_frozen(
    verdict: StepVerdict, param: torch.Tensor, slot: Slot, grad: torch.Tensor
) -> None:
    # torch's optimizers apply any gradient present, requires_grad or not: a
    # frozen layer whose old gradient was never cleared keeps moving by it.
    # Only that is judged; a clear before the step applies nothing, which is
    # what freezing asks for.
    verdict.with_grad.append(param)
    if slot.fresh:
        verdict.any_fresh = True
        if slot.holds(grad):
            if slot.stale:
                verdict.stale.append(param)
        elif slot.stale:
            verdict.reapplied_changed.append(param)  # zeros: a clear, fine; else still stale
        else:
            verdict.maybe_zero.append(param)
    elif slot.discarded:
        if not slot.holds(grad):
            verdict.maybe_zero.append(param)  # clipped zeros, or written since
    else:
        _judge_unchanged(verdict, param, slot, grad, trainable=False)


def _judge_unchanged(
    verdict: StepVerdict, param: torch.Tensor, slot: Slot, grad: torch.Tensor, *, trainable: bool
) -> None:
    """A gradient no backward wrote since the last step or clear."""
    ref = slot.ref
    if ref is None or ref() is not grad:
        # Assigned by hand (torch.func, per-sample gradients, master weights):
        # a gradient produced since the last step, not one we can call stale.
        verdict.assigned.append(param)
    elif version_of(grad) == slot.version:
        if slot.applied:
            verdict.reapplied.append(param)
    elif grad.is_sparse:
        pass
    elif slot.applied and not trainable:
        # A frozen layer's old gradient, rescaled by a clip over the model.
        verdict.reapplied_changed.append(param)
    else:
        # Written in place since: copied into by hand, or zeroed by a clear
        # no wrapper sees. Which one, the device says.
        verdict.rewritten.append(param)


class Windows:
    """What happens between steps: accumulation windows and discarded backward results.

    With ``accumulation_steps`` declared, a window of another length or a
    clear inside one is GG104. A final short window is allowed (the end of an
    epoch); two short windows in a row are not.

    Without a declaration, backward results cleared before any step used
    them are GG105 once it happens between ``streak`` steps in a row: an
    occasional discard (an AMP skip, a saliency pass) is not a finding.
    """

    def __init__(self, declared: int | None, streak: int = 3) -> None:
        self.declared = declared
        self.streak = streak
        self._short_before = False
        self._discards = 0

    def judge(self, verdict: StepVerdict) -> tuple[str, list[torch.Tensor], str] | None:
        """Return ``(code, params, detail)`` for this step's window, or ``None``."""
        if self.declared is not None:
            return self._judge_declared(verdict, self.declared)
        if verdict.lost and verdict.any_fresh and not verdict.cleared:
            self._discards += 1
        else:
            self._discards = 0
        if self._discards >= self.streak:
            return ("GG105", verdict.lost, f"seen before {self._discards} steps in a row")
        return None

    def _judge_declared(
        self, verdict: StepVerdict, declared: int
    ) -> tuple[str, list[torch.Tensor], str] | None:
        micro = verdict.micro_batches
        short, self._short_before = self._short_before, 0 < micro < declared
        # Whole windows thrown away are steps that never ran (a GradScaler skips
        # the step on inf and the next zero_grad clears the window), not a
        # clear inside one.
        if verdict.lost and verdict.lost_micro_batches % declared:
            return ("GG104", verdict.lost, "a clear inside the window threw micro-batches away")
        if micro > declared:
            detail = f"step after {micro} micro-batches, accumulation_steps={declared}"
            return ("GG104", verdict.fresh, detail)
        if short and self._short_before:
            detail = f"a second short window in a row: {micro} of {declared} micro-batches"
            return ("GG104", verdict.fresh, detail)
        return None
