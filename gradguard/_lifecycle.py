"""GG101-GG103: which of a step's verdict lists becomes which code, on what evidence.

`judge_step` (`_checks`) sorts what a step is about to apply into the lists of
a `StepVerdict`. Some lists say enough at the step: a gradient cleared after
backward is GG102. For others only the gradient's content tells (zeros apply
nothing; a clear no wrapper sees leaves zeros, a clip does not), and only the
device knows it: one zero check per step asks which of them are all zeros.
`RULES` says, for every list, the code at the step and what zeros and content
mean once the device answers. `Lifecycle` follows the table; nothing else
decides GG101-GG103.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
import weakref
from collections.abc import Callable
from itertools import compress, repeat
from typing import Literal

import torch

from gradguard._checks import StepVerdict
from gradguard._findings import OUTSIDE
from gradguard._health import FiniteProbe, Readback, zero_flags
from gradguard._naming import Location, Place
from gradguard._schedule import AFTER_PENDING, Schedule
from gradguard._tracker import REGISTRY, Slot

Params = list[torch.Tensor]
Entries = list[tuple[torch.Tensor, Slot]]
Report = Callable[..., None]
"""Reports a code for some parameters, at a place and step, with a detail (the guard's
``_report``; ``written_at`` and ``cleared_at`` tell a lifecycle finding's story)."""
StepNorms = Callable[[Params], "Readback | None"]
"""Queues the step's norm pass over these parameters, shared with the numeric checks."""

USED = "used"
"""Content written by hand: the parameter counts as used (GG301), no finding."""

# Why the first step of an optimizer picked up at that step, with no gradient
# at all, is GG103 although gradguard saw nothing before it.
_UNWATCHED_FIRST_STEP = "no parameter had a gradient at the first step gradguard watched"


Story = tuple["Location | None", "Location | None"]
"""Where backward was called, and the zero_grad() that cleared what it wrote (``None``:
unknown, or no optimizer's); `_told` makes it the finding's text."""


def _told(story: Story) -> dict[str, str]:
    """A GG102's story as `make_finding`'s ``written_at`` and ``cleared_at`` (with no
    backward's line, nothing to tell)."""
    written, cleared = story
    if written is None:
        return {}
    return {"written_at": str(written), "cleared_at": str(cleared) if cleared else OUTSIDE}


def _added(written: Location | None) -> dict[str, str]:
    """A GG101's story: where the backward that added to applied gradients was called."""
    return {} if written is None else {"written_at": str(written)}


@dataclasses.dataclass(frozen=True)
class Rule:
    """What the parameters of one `StepVerdict` list become.

    Attributes:
        now: the code they get at the step, before the device answers. GG101
            waits for an earlier zero check still on the device that decides
            whether what the previous step applied was zeros (then nothing was
            applied, and nothing is stale).
        ask: whether the step's zero check asks about them: always, never,
            or only those an earlier check still decides (``"pending"``).
        zeros: what the ones found all zeros mean. GG102: a clear no wrapper
            saw, once the `FiniteProbe` tells it from a ``nan_to_num_`` of a
            NaN backward. GG103: they apply nothing, which is GG103 when
            nothing else in the step applies anything.
        content: what the ones found finite and nonzero mean. GG101, unless
            an earlier check found what the previous step applied was zeros;
            `USED`: new content written by hand.
        whole: zeros count only when every one of the list is zero and none
            is non-finite (a clip scales them all, a clear zeroes them all).
    """

    now: str | None = None
    ask: Literal["always", "never", "pending"] = "never"
    zeros: str | None = None
    content: str | None = None
    whole: bool = False


RULES: dict[str, Rule] = {
    # Backward's gradient, cleared before the step: thrown away.
    "cleared": Rule(now="GG102"),
    # A backward accumulated onto what a step applied.
    "stale": Rule(now="GG101"),
    # What the previous step applied, untouched since: applied again.
    "reapplied": Rule(now="GG101", ask="pending", zeros="GG103"),
    # Stale, then changed in place: zeroed by a clear no wrapper saw, or clipped.
    "stale_changed": Rule(ask="always", zeros="GG102", content="GG101"),
    # Fresh, then changed in place: all zeros is a clear no wrapper saw, else a clip.
    "changed": Rule(ask="always", zeros="GG102", whole=True),
    # A frozen layer's applied gradient, changed in place: cleared, or clipped again.
    "reapplied_changed": Rule(ask="always", zeros="GG103", content="GG101"),
    # Written in place with no backward: by hand, or by a clear no wrapper saw.
    "rewritten": Rule(ask="always", zeros="GG103", content=USED),
    # Assigned with no backward: by hand (torch.func, per-sample gradients).
    "assigned": Rule(ask="always", zeros="GG103", content=USED),
    # Changed in place where only "applies nothing" matters later.
    "maybe_zero": Rule(ask="always"),
}

_ASKED = [(name, rule) for name, rule in RULES.items() if rule.ask != "never"]
_AT_STEP = [(name, rule.now) for name, rule in RULES.items() if rule.now is not None]
_STALE_LISTS = [n for n, r in RULES.items() if "GG101" in (r.now, r.content)]


class _Stale:
    """GG101's parameters for one step, from every rule that names them.

    Some are known at the step, others only once a zero check on the device
    has answered; queued after those checks, the step reports them as one
    finding.
    """

    __slots__ = ("refs",)

    def __init__(self) -> None:
        self.refs: list[weakref.ref[torch.Tensor]] = []

    def add(self, params: Params) -> None:
        self.refs += map(weakref.ref, params)

    def params(self, order: Params) -> Params:
        """The live ones, once each, in ``order`` (the optimizer's) where it has them."""
        found = {id(p): p for r in self.refs if (p := r()) is not None}
        if not found:
            return []
        ordered = [p for p in order if id(p) in found]
        return ordered if len(ordered) == len(found) else list(found.values())


@dataclasses.dataclass
class _Asked:
    """One step's zero check: what each list asked, and what follows from the answer."""

    step: int
    location: Place
    lists: list[tuple[Rule, Params]]
    count: int
    pending: dict[int, int]  # param id -> the earlier step whose check decides its content
    stale: _Stale
    nothing_else: bool  # nothing but zeros could be left for the step to apply
    written: Location | None  # where the backward was called, for the story
    probed: bool = False  # the finite probe's reading is the last value
    from_norms: bool = False  # the values are the step's gradient norms, not zero flags
    finite: float | None = None  # what the finite probe read, once known


class Lifecycle:
    """Turns a step's verdict into GG101-GG103, following `RULES`.

    Owns what the zero checks taught: which applied gradients a check still
    on the device decides (``pending``), which were zeros, and the
    `FiniteProbe` that tells a clear no wrapper sees from a ``nan_to_num_``.
    """

    def __init__(
        self,
        schedule: Schedule,
        report: Report,
        slots: dict[int, Slot],
        order: Callable[[], Params],
        *,
        strict: bool,
        on_error: Callable[[BaseException], None],
    ) -> None:
        self._schedule = schedule
        self._report = report
        self._slots = slots  # the guard's; read here, never written
        self._order = order
        self._strict = strict
        self.probe = FiniteProbe(on_error)
        # param id -> the step whose zero check, still on the device, says whether
        # what that step applied was zeros; and the latest step whose check did.
        self.pending: dict[int, int] = {}
        self._found_zero: dict[int, int] = {}
        # The step whose zero check was asked and that is not recorded as applied yet.
        self.applying: int | None = None
        self._zero_applied: set[int] = set()  # params that step applies as all zeros
        # Where a zero_grad() threw backward's gradients away since the last step, and
        # where that backward was called: the story of a GG102.
        self._cleared: Story | None = None
        self._unwatched = False  # the unwatched first step found no gradient
        self._held_empty: tuple[Place, int] | None = None  # see `report_held_empty`

    def cleared(self, where: Location, written: Location | None) -> None:
        """A ``zero_grad()`` at ``where`` threw away what the backward at ``written`` wrote."""
        self._cleared = (written, where)

    def first_step_unwatched(self, entries: Entries) -> bool:
        """The first step of an optimizer picked up at that step: judge it only if empty.

        The backward before it ran before any hook existed. But a step that
        finds no gradient at all applies nothing, whatever came before (GG103),
        unless it makes its own: then it is judged when it returns.
        """
        self._unwatched = not any(p.grad is not None for p, _ in entries if p.requires_grad)
        return self._unwatched

    def judge(
        self, verdict: StepVerdict, location: Place, step: int, norms: StepNorms | None = None
    ) -> None:
        """GG101-GG103: was this step's gradient made, kept and cleared at the right time.

        ``norms`` queues the norm pass the numeric checks take at this step:
        when the zero check asks about exactly the gradients it norms (a
        clipped step), a norm of zero answers it, and one pass serves both.
        """
        # Where backward was called, and where a zero_grad() cleared what it wrote
        # (None: outside any optimizer); made text only when a finding tells it.
        story = self._cleared or (REGISTRY.backward_at, None)
        self._cleared = None
        if self._held_empty is not None:
            self.report_held_empty(verdict.cleared, story)
        if verdict.usual:
            if self.probe.holding:
                self.probe.take()  # what it read is about no gradient judged here
            self._unwatched = False
            return
        self.applying = step
        pending = self._pending_for(verdict)
        stale = _Stale()
        settled_now = False
        for name, code in _AT_STEP:
            params = getattr(verdict, name)
            settled = [p for p in params if id(p) not in pending]
            settled_now = settled_now or bool(settled)
            if code == "GG101":
                stale.add(settled)
                self._stale_once_known([p for p in params if id(p) in pending], pending, stale)
            else:
                self._report(code, settled, location, step, **_told(story))
        nothing_else = not (verdict.any_fresh or settled_now)
        probe = (self.probe.key, self.probe.take())
        asked = _Asked(step, location, [], 0, pending, stale, nothing_else, story[0])
        for name, rule in _ASKED:
            params = getattr(verdict, name)
            if rule.ask == "pending":
                params = [p for p in params if id(p) in pending]
            asked.lists.append((rule, params))
            asked.count += len(params)
        judged = self._ask(asked, probe, verdict.with_grad, norms)
        if verdict.changed and not judged and not self._strict:
            # Its answer comes after this step: arm the probe now rather than then, so
            # the next backward's reading is there to tell a clear from nan_to_num_.
            self.probe.arm(min(verdict.changed, key=torch.Tensor.numel))
        self._report_stale(stale, location, step, story[0])
        if verdict.nothing_to_apply and self._unwatched:
            location.get()  # reported at the next step: where this one is, found now
            self._held_empty = (location, step)
        elif verdict.nothing_to_apply:
            self._report("GG103", [], location, step, "")
        self._unwatched = False

    def applied(self, entries: Entries, step: int) -> None:
        """The step is recorded as applied: what its checks found zeros stays so.

        Needed only after a step with ``applying`` set or checks ``pending``.
        """
        self.applying = None
        zero_applied, self._zero_applied = self._zero_applied, set()
        if self.pending:  # this step's apply replaced what earlier checks were about
            self.pending = {k: s for k, s in self.pending.items() if s == step}
        if zero_applied:
            for param, slot in entries:
                if id(param) in zero_applied:
                    slot.found_zeros()

    def report_held_empty(self, cleared: Params, story: Story = (None, None)) -> None:
        """The unwatched first step that found no gradient, now that the next step is known.

        Nothing before that first step was seen, so its emptiness has two
        causes: no backward before it (GG103), or a clear between backward
        and step, the tutorial's bug, which the next step then shows as GG102
        too: the first step is reported the same way.
        """
        held, self._held_empty = self._held_empty, None
        if held is None:
            return
        location, step = held
        if cleared:
            self._report("GG102", cleared, location, step, **_told(story))
        else:
            self._report("GG103", [], location, step, _UNWATCHED_FIRST_STEP)

    def with_content(self, params: Params, step: int, then: Callable[[Params], None]) -> None:
        """``then`` with those of ``params`` that this step's zero check did not find all
        zeros (not asked about: content), once every check still on the device answered."""

        def resolve(_values: list[float], alive: list[torch.Tensor | None]) -> None:
            then([p for p in alive if p is not None and self._found_zero.get(id(p)) != step])

        if self._schedule.queue:
            self._schedule.defer(AFTER_PENDING, params, resolve)
        else:
            resolve([], list(params))

    def close(self) -> None:
        self.probe.remove()

    # -- the rules' evidence ---------------------------------------------------

    def _pending_for(self, verdict: StepVerdict) -> dict[int, int]:
        """GG101's candidates whose applied content an earlier check still decides."""
        if not self.pending:
            return {}
        named = [p for name in _STALE_LISTS for p in getattr(verdict, name)]
        return {id(p): self.pending[id(p)] for p in named if id(p) in self.pending}

    def _was_zeros(self, param: torch.Tensor, pending: dict[int, int]) -> bool:
        """Whether the earlier check that decided ``param``'s applied content found zeros."""
        step = pending.get(id(param))
        return step is not None and self._found_zero.get(id(param)) == step

    def _stale_once_known(self, params: Params, pending: dict[int, int], stale: _Stale) -> None:
        """GG101 for these once the earlier checks have said their applied content was not
        zeros (judged after them)."""
        if not params:
            return

        def resolve(values: list[float], alive: list[torch.Tensor | None]) -> None:
            stale.add([p for p in alive if p is not None and not self._was_zeros(p, pending)])

        self._schedule.defer(AFTER_PENDING, params, resolve)

    def _report_stale(
        self, stale: _Stale, location: Place, step: int, written: Location | None
    ) -> None:
        """GG101 once, after every check that adds to it."""
        if self._schedule.queue:  # some check is still on the device: report after it

            def resolve(values: list[float], alive: list[torch.Tensor | None]) -> None:
                params = stale.params(self._order())
                self._report("GG101", params, location, step, **_added(written))

            self._schedule.defer(AFTER_PENDING, [], resolve)
        elif stale.refs:
            params = stale.params(self._order())
            self._report("GG101", params, location, step, **_added(written))

    def _ask(
        self,
        asked: _Asked,
        probe: tuple[int | None, torch.Tensor | None],
        normed: Params,
        norms: StepNorms | None,
    ) -> bool:
        """Ask the device which asked gradients are all zeros; judge by `RULES` once known.

        Non-finite gradients are neither zeros nor content (GG201's business:
        clipping spreads one NaN over every gradient, zeros included). The
        finite probe's reading is read back too when its parameter is asked
        about for GG102. Returns whether it was judged now (also when there
        was nothing to ask).
        """
        params = [p for _, ps in asked.lists for p in ps]
        if not params:
            return True
        key, reading = probe
        gg102 = [p for rule, ps in asked.lists if rule.zeros == "GG102" for p in ps]
        extra = reading if reading is not None and any(id(p) == key for p in gg102) else None
        asked.from_norms = (
            norms is not None
            and len(params) == len(normed)
            and all(map(operator.is_, params, normed))
        )
        if asked.from_norms and norms is not None:
            if extra is not None:  # read on its own, judged just before the norms
                done = functools.partial(self._probed, asked)
                self._schedule.defer(Readback(extra.reshape(1)), [], done)
            readback = norms(normed)
        else:
            asked.probed = extra is not None
            grads = [p.grad for p in params if p.grad is not None]
            readback = zero_flags(grads, extra) if len(grads) == len(params) else None
            del grads  # never hold gradients past this call
        if readback is None:
            return True
        if self._schedule.defer(readback, params, lambda v, a: self._answered(asked, v, a)):
            return True
        for p in params:  # what this step applies is content until the device says
            self.pending[id(p)] = asked.step
        return False

    @staticmethod
    def _probed(asked: _Asked, values: list[float], _alive: list[torch.Tensor | None]) -> None:
        asked.finite = values[0]

    def _answered(
        self, asked: _Asked, values: list[float], alive: list[torch.Tensor | None]
    ) -> None:
        """The zero check answered (1.0 zero, 0.0 content, NaN non-finite): apply `RULES`."""
        step = asked.step
        if asked.from_norms:  # a norm of zero is all zeros; a non-finite one (v - v), neither
            values = [1.0 if v == 0 else 0.0 if v - v == 0 else math.nan for v in values]
        elif asked.probed:
            asked.finite = values[asked.count]
        finite = asked.finite
        values = values[: asked.count]
        if self.pending:
            for p in alive:
                if p is not None and self.pending.get(id(p)) == step:
                    del self.pending[id(p)]
        for p in compress(alive, map(operator.eq, values, repeat(1.0))):
            if p is not None:
                self._learn_zeros(p, step)
        unseen_clear: Params = []
        applies_nothing = asked.nothing_else
        nothing_asked = True
        start = 0
        for rule, params in asked.lists:
            end = start + len(params)
            flags, here = values[start:end], alive[start:end]
            start = end
            if not params:
                continue
            zero = list(map(operator.eq, flags, repeat(1.0)))
            every = all(zero) and all(map(operator.is_not, here, repeat(None)))
            if rule.zeros == "GG102" and any(zero) and (every or not rule.whole):
                unseen_clear += [p for p in compress(here, zero) if p is not None]
            elif rule.zeros == "GG103":
                nothing_asked = False
                applies_nothing = applies_nothing and every
            if rule.content is None:
                continue
            content = [
                p for p in compress(here, map(operator.eq, flags, repeat(0.0))) if p is not None
            ]
            if rule.content == "GG101":
                asked.stale.add([p for p in content if not self._was_zeros(p, asked.pending)])
            elif rule.content == USED:
                for p in content:
                    slot = self._slots.get(id(p))
                    if slot is not None:
                        slot.mark_used()
        location = asked.location
        if unseen_clear:
            self._unseen_clear(unseen_clear, finite, location, step, asked.written)
        if applies_nothing and not nothing_asked:
            self._report("GG103", [], location, step, "")

    def _learn_zeros(self, param: torch.Tensor, step: int) -> None:
        """``param``'s gradient at ``step`` was all zeros: that step applied nothing to it."""
        if step == self.applying:  # the step has not recorded what it applied yet
            self._zero_applied.add(id(param))
        self._found_zero[id(param)] = step
        slot = self._slots.get(id(param))
        if slot is not None:
            slot.found_zeros()

    def _unseen_clear(
        self,
        zeros: Params,
        finite: float | None,
        location: Place,
        step: int,
        written: Location | None,
    ) -> None:
        """Fresh gradients zeroed in place by something no wrapper sees: GG102 if a clear.

        A sanitising ``nan_to_num_`` leaves the same zeros when backward wrote
        NaN. The first time, the `FiniteProbe` is armed on one of these
        parameters; from then on, what backward wrote into it decides.
        """
        if finite is None:  # the probe watched none of them in this step's backward
            self.probe.arm(min(zeros, key=torch.Tensor.numel))
        elif finite == 1.0:
            self._report("GG102", zeros, location, step, **_told((written, None)))
