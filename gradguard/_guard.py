"""`Guard`: attaches to one optimizer, owns its hooks, turns verdicts into findings."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import operator
import sys
import threading
import weakref
from collections import defaultdict
from collections.abc import Callable
from types import FrameType
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from gradguard._checks import StepVerdict, Windows, judge_step
from gradguard._compiled import RUN_CODE, hook_caller, untraced
from gradguard._config import Options
from gradguard._dispatch import (
    Reporter,
    SummaryRow,
    _log,
    emit_info,
    emit_record,
    has_record_sinks,
)
from gradguard._exceptions import GradGuardError, GradGuardWarning
from gradguard._findings import Finding, make_finding
from gradguard._health import (
    LATENESS,
    BackwardNorms,
    Cadence,
    FiniteProbe,
    ModuleNorms,
    NormHistory,
    Readback,
    grad_norms,
    largest_shares,
    zero_flags,
)
from gradguard._models import ModelWatch, Sighting
from gradguard._naming import Location, ParamNamer, Place, fallback_names
from gradguard._ranks import compare as compare_ranks
from gradguard._ranks import start as start_rank_check
from gradguard._schedule import AFTER_PENDING, Schedule
from gradguard._sharded import is_sharded
from gradguard._sharded import sources as sharded_sources
from gradguard._tracker import (
    REGISTRY,
    STEPS,
    Slot,
    Split,
    catch_up,
    inside_backward,
    learn_shared,
    mark_applied,
    mark_cleared,
)

Entries = list[tuple[torch.Tensor, Slot]]
Args = tuple[Any, ...]
Kwargs = dict[str, Any]
Refs = list[weakref.ref[torch.Tensor]]

_PROPAGATE = (GradGuardError, GradGuardWarning)
"""What a hook lets through: a strict finding, or a warning the user's filters made an error."""

_GUARDS: weakref.WeakKeyDictionary[torch.optim.Optimizer, Guard] = weakref.WeakKeyDictionary()
_LABELS: defaultdict[str, itertools.count[int]] = defaultdict(itertools.count)
_LOCK = threading.Lock()
# How often the model-level check for parameters no optimizer holds runs.
_UNOPTIMIZED_EVERY = 25
# Why the first step of an optimizer picked up at that step, with no gradient
# at all, is GG103 although gradguard saw nothing before it.
_UNWATCHED_FIRST_STEP = "no parameter had a gradient at the first step gradguard watched"
# Whether a guard of this run (since the last time no guard was left) opened
# its `Sighting`: one per run, however many optimizers are guarded.
_SIGHTED = False


_PARAMS = operator.itemgetter("params")
_GRAD = operator.attrgetter("grad")
_REQUIRES_GRAD = operator.attrgetter("requires_grad")
_USED = operator.attrgetter("used")
_FIRST = operator.itemgetter(0)
_SECOND = operator.itemgetter(1)

Params = list[torch.Tensor]


@dataclasses.dataclass(frozen=True)
class ZeroCheck:
    """The device's answer to "which of these gradients are exactly zero?" for one step.

    Attributes:
        step: the step it is about.
        zero: the parameters whose gradient is all zeros.
        nonzero: those whose gradient is finite and not all zeros.
        complete: every parameter asked about is in one of the two (none was
            non-finite, or collected since).
        unknown: those whose gradient was not finite.
        finite: what the `FiniteProbe` read in the step's backward (1.0
            finite, 0.0 not), if it watched one of these parameters.
    """

    step: int
    zero: Params
    nonzero: Params
    complete: bool
    finite: float | None
    unknown: Params = dataclasses.field(default_factory=list)


ZeroJudge = Callable[[ZeroCheck], None]


class _Stale:
    """GG101's parameters for one step, from every check that names them.

    Some are known at the step, others only once a zero check on the device
    has answered; queued after those checks, the step reports them as one
    finding.
    """

    __slots__ = ("refs",)

    def __init__(self) -> None:
        self.refs: Refs = []

    def add(self, params: list[torch.Tensor]) -> None:
        self.refs += _refs(params)

    def params(self, order: list[torch.Tensor]) -> list[torch.Tensor]:
        """The live ones, once each, in ``order`` (the optimizer's) where it has them."""
        found = {id(p): p for r in self.refs if (p := r()) is not None}
        if not found:
            return []
        ordered = [p for p in order if id(p) in found]
        return ordered if len(ordered) == len(found) else list(found.values())


def _refs(params: list[torch.Tensor]) -> Refs:
    return list(map(weakref.ref, params))


# Every optimizer's step runs inside torch's hook-calling wrapper; they all
# share this code object.
_STEP_CODE = getattr(torch.optim.Optimizer.profile_hook_step(lambda *a: None), "__code__", None)


def _step_running() -> bool:
    """Whether this thread is inside some optimizer's ``step()`` (a frame walk; rare path)."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code is _STEP_CODE:
            return True
        frame = frame.f_back
    return False


class Guard:
    """Watches one optimizer and reports gradient-handling bugs in its loop.

    Created by `gradguard.guard` and `gradguard.guarding`; not constructed
    directly. It holds the optimizer weakly and is closed when the optimizer
    is garbage-collected.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        models: list[nn.Module],
        options: Options,
        judge_first_step: bool = True,
    ) -> None:
        self.options = options
        kind = type(optimizer).__name__
        self.optimizer: str = f"{kind}#{next(_LABELS[kind])}"
        self._reporter = Reporter(options.mode, options.ignore)
        self._namer = ParamNamer(models)
        self._models = ModelWatch(models)
        self._windows = Windows(options.accumulation_steps)
        self._norms = NormHistory(options.explode_factor, options.max_grad_norm)
        self._cadence = Cadence(options.numerics_every)
        self._module_norms: tuple[Entries, ModuleNorms] | None = None
        self._opt_ref = weakref.ref(optimizer, self._optimizer_collected)
        self._slots: dict[int, Slot] = {}
        self._params: list[torch.Tensor] = []
        self._cache: Entries = []
        self._slot_list: list[Slot] = []  # the cache's slots, in order
        self._unhooked: Entries = []
        self._never_used: Entries = []
        self._unused: dict[int, tuple[weakref.ref[torch.Tensor], int]] = {}
        self._named: dict[tuple[int, ...], tuple[str, ...]] = {}  # naming is not free
        self._schedule = Schedule(self._going_late)
        self._fallback: dict[int, str] | None = None  # group names, for after the optimizer
        # param id -> the step whose zero check, still on the device, says whether
        # what that step applied was zeros; and the latest step whose check did.
        self._tentative: dict[int, int] = {}
        self._found_zero: dict[int, int] = {}
        self._current: Entries | None = None
        self._usual: Split | None = None  # the step running, judged usual: `mark_applied`
        self._place: Place | None = None  # where the step being judged is
        self._zero_applied: set[int] = set()  # params this step applies as all-zero
        self._finite_probe = FiniteProbe(self._hook_failed)
        self._backward_norms = BackwardNorms(self._collect_raw, self._hook_failed)
        self._sighting: Sighting | None = None  # GG302 beyond the known models
        self._probe_shared = True  # look for gradients in shared buffers at the next step
        self._hook_fsdp = True  # look for what FSDP's autograd writes to (see `_sharded`)
        self._sharded: bool | None = None  # whether FSDP shards the parameters (GG401)
        self._step = 0
        self._judge_next = judge_first_step
        self._unwatched = False  # the unwatched first step found no gradient: see _before_step
        self._held_empty: tuple[Place, int] | None = None  # see _report_held_empty
        self._judge_after: int | None = None  # frame of a closure step judged when it returns
        self._closed = False
        self._failed = False
        self._handles: list[tuple[str, RemovableHandle]] = []
        self._late: list[tuple[str, RemovableHandle]] = []  # see _detach
        self._wrapped: dict[str, Any] = {}  # method name -> what our wrapper replaced
        self._token = object()  # marks our wrappers
        self._entries(optimizer)
        self._handles.append(("pre", optimizer.register_step_pre_hook(self._pre_hook)))
        self._handles.append(("post", optimizer.register_step_post_hook(self._post_hook)))
        # zero_grad: no torch hook sees a clear. add_param_group: new
        # parameters are tracked at once, before a backward can write to them.
        self._wrap(optimizer, "zero_grad", before="_before_zero_grad", after="_on_zero_grad")
        self._wrap(optimizer, "add_param_group", before=None, after="_on_add_param_group")

    # -- public --------------------------------------------------------------

    @property
    def mode(self) -> str:
        """``"warn"``, ``"strict"`` or ``"log"``."""
        return self.options.mode

    @property
    def findings(self) -> list[Finding]:
        """Each distinct finding once, in the order first seen."""
        return self._reporter.findings

    @property
    def counts(self) -> dict[Finding, int]:
        """How many times each finding in `findings` fired."""
        return dict(self._reporter.counts)

    @property
    def closed(self) -> bool:
        """Whether the guard is closed: by `close`, or disabled by an internal error."""
        return self._closed

    def summary(self) -> list[SummaryRow]:
        """Per finding code: count, first step, first location and the fix."""
        return self._reporter.summary()

    def settle(self) -> None:
        """Judge the device results still pending now, waiting for the device if need be.

        Closing does this too; call it to read `findings` complete mid-run
        (it is one host-device sync on CUDA when anything is pending).
        """
        if self._closed or not self._schedule.queue:
            return
        try:
            self._schedule.drain(wait=True)
        except _PROPAGATE:
            raise
        except Exception as exc:
            self._fail(exc, "settling")

    def close(self) -> None:
        """Report pending results, then remove every hook and wrapper; idempotent."""
        if self._closed:
            self._sweep()  # hooks a failure left for later, now that it is safe
            return
        try:
            self._schedule.drain(wait=True)
            self._report_held_empty([])
            self._report_unused(final=True)
        except _PROPAGATE:
            raise
        except Exception as exc:
            self._fail(exc, "close")
        finally:
            self._detach()

    # -- hooks ---------------------------------------------------------------

    @untraced  # a compiled step runs its hooks eagerly, so every step is judged
    def _pre_hook(self, opt: torch.optim.Optimizer, args: Args, kwargs: Kwargs) -> None:
        if self._closed:
            self._sweep("post")  # torch is iterating the pre-hooks, not the post-hooks
            return
        # torch's step wrapper, which calls both hooks (through `untraced`).
        run = sys._getframe(1)
        wrapper = run.f_back if run.f_code is RUN_CODE and run.f_back else hook_caller()
        try:
            if self._before_step(opt, args, kwargs):
                self._judge_after = id(wrapper)
        except _PROPAGATE:
            raise  # strict mode, or -W error: the step does not run, so it is not pushed
        except Exception as exc:
            self._fail(exc, "the step pre-hook", iterating="pre")
            return
        STEPS.push(wrapper)

    @untraced
    def _post_hook(self, opt: torch.optim.Optimizer, args: Args, kwargs: Kwargs) -> None:
        run = sys._getframe(1)
        wrapper = run.f_back if run.f_code is RUN_CODE and run.f_back else hook_caller()
        STEPS.pop(wrapper)
        if self._closed:
            self._sweep("pre")
            return
        error: BaseException | None = None
        try:
            error = self._after_step(opt, id(wrapper))
        except Exception as exc:
            self._fail(exc, "the step post-hook", iterating="post")
        if error is not None:
            raise error

    def _after_step(self, opt: torch.optim.Optimizer, wrapper: int) -> BaseException | None:
        """Judge a closure step now that it returned; record what the step applied.

        Returns a strict-mode finding to raise once the step is recorded.
        """
        REGISTRY.new_window()
        entries = self._current if self._current is not None else self._entries(opt)
        self._current = None
        usual, self._usual = self._usual, None
        error: BaseException | None = None
        if self._judge_after is not None and self._judge_after == wrapper:
            self._judge_after = None
            try:
                self._judge(opt, entries)
            except _PROPAGATE as exc:
                error = exc
        if STEPS.frames and STEPS.running():
            return error  # nested: the outer step records what it applied, once judged
        zero_applied, self._zero_applied = self._zero_applied, set()
        # `_halves`, with its usual case inline: one call fewer at every step.
        params, slots = (
            (self._params, self._slot_list) if entries is self._cache else self._halves(entries)
        )
        mark_applied(entries, params, slots, usual=usual)
        if self._tentative:  # this step's apply replaced what earlier checks were about
            step = self._step
            self._tentative = {k: s for k, s in self._tentative.items() if s == step}
        if zero_applied:
            for param, slot in entries:
                if id(param) in zero_applied:
                    slot.found_zeros()
        return error

    def _before_step(self, opt: torch.optim.Optimizer, args: Args, kwargs: Kwargs) -> bool:
        """Count and judge a step about to run; true when it is judged when it returns.

        A step given a closure (LBFGS, SAM, every step PyTorch Lightning takes)
        may run backward and zero_grad inside itself, so what it applies is
        only known once it returns.
        """
        if STEPS.frames and STEPS.running():
            self._current = None
            return False  # nested in another step: one update, judged by the outer step
        self._step += 1
        self._judge_after = None  # a step that died raising never returned to be judged
        if LATENESS.steps:
            LATENESS.step_began()
        if self._schedule.queue:
            self._schedule.drain(wait=False)
        entries = self._current = self._entries(opt)
        if self._probe_shared:
            self._probe_shared = False
            learn_shared(entries)
        if inside_backward():
            catch_up(entries)
        closure = args[1] if len(args) > 1 else kwargs.get("closure")
        judge, self._judge_next = self._judge_next, True
        if not judge:
            # The first step of an optimizer picked up at that step: the
            # backward before it ran before any hook existed. But a step that
            # finds no gradient at all applies nothing, whatever came before
            # (GG103), unless it makes its own: judged when it returns.
            self._unwatched = not any(p.grad is not None for p, _ in entries if p.requires_grad)
            return self._unwatched
        if closure is not None:
            return True
        verdict = judge_step(entries, self._params, self._slot_list)
        if not verdict.usual and verdict.nothing_new:
            # Nothing new to apply yet: the step may make its own gradients
            # (GSAM's set_closure, any optimizer holding its closure).
            return True
        self._usual = verdict.usual
        self._judge(opt, entries, verdict)
        return False

    def _before_zero_grad(self, opt: torch.optim.Optimizer) -> None:
        # Hook parameters unfrozen since the last step before their gradients
        # go, so a backward that wrote to them counts as thrown away.
        self._entries(opt)

    def _on_zero_grad(self, opt: torch.optim.Optimizer) -> None:
        REGISTRY.new_window()
        # `_before_zero_grad` brought the entries up to date a moment ago.
        mark_cleared(self._cache, self._slot_list, bool(STEPS.frames) and STEPS.running())

    def _on_add_param_group(self, opt: torch.optim.Optimizer) -> None:
        self._entries(opt)

    # -- judging -------------------------------------------------------------

    def _judge(
        self, opt: torch.optim.Optimizer, entries: Entries, verdict: StepVerdict | None = None
    ) -> None:
        self._place = Place()
        try:
            self._judge_at(opt, entries, verdict, self._place)
        finally:
            self._place = None

    def _judge_at(
        self,
        opt: torch.optim.Optimizer,
        entries: Entries,
        verdict: StepVerdict | None,
        location: Place,
    ) -> None:
        every = self.options.check_ranks_every
        if every is not None and self._step % every == 0:
            self._check_ranks(entries, location)  # first: every rank must take part
        if verdict is None:
            verdict = judge_step(entries, *self._halves(entries))
        if not verdict.trainable:
            return
        self._judge_lifecycle(verdict, location)
        window = self._windows.judge(verdict)
        if window is not None:
            self._report(window[0], window[1], location, self._step, window[2])
        if (self.options.check_numerics or self.options.record_norms) and verdict.with_grad:
            self._check_numerics(opt, verdict, location)
        self._judge_models(entries, verdict, location)
        if self.options.mode == "strict":
            self._schedule.drain(wait=True)  # the step's results, read with one sync: raised here

    def _judge_lifecycle(self, verdict: StepVerdict, location: Place) -> None:
        """GG101-GG103: was this step's gradient made, kept and cleared at the right time."""
        step = self._step
        if self._held_empty is not None:
            self._report_held_empty(verdict.cleared)
        if verdict.usual:
            if self._finite_probe.holding:
                self._finite_probe.take()  # what it read is about no gradient judged here
            self._unwatched = False
            return
        # A gradient some step applied is content until a zero check still on
        # the device says it was zeros (`_tentative`): GG101 about it waits.
        tentative = {id(p): self._tentative[id(p)] for p in self._uncertain(verdict)}
        stale = [p for p in verdict.stale if id(p) not in tentative]
        reapplied = [p for p in verdict.reapplied if id(p) not in tentative]
        gg101 = _Stale()
        gg101.add(stale + reapplied)
        self._report("GG102", verdict.cleared, location, step)
        self._stale_once_known([p for p in verdict.stale if id(p) in tentative], tentative, gg101)
        # Gradients changed in place since we saw them: a clip leaves them
        # nonzero, a clear we could not see leaves zeros. Ask the device.
        probe = (self._finite_probe.key, self._finite_probe.take())
        self._defer_zero(
            verdict.stale_changed,
            functools.partial(self._stale_changed, location, tentative, gg101),
            probe,
        )
        judged = self._defer_zero(
            verdict.changed, functools.partial(self._changed, location), probe
        )
        if verdict.changed and not judged and self.options.mode != "strict":
            # Its answer comes after this step: arm the probe now rather than then, so
            # the next backward's reading is there to tell a clear from nan_to_num_.
            self._finite_probe.arm(min(verdict.changed, key=torch.Tensor.numel))
        only_zeros_left = not (verdict.any_fresh or stale or reapplied or verdict.cleared)
        # Re-applied untouched since (tentative ones too: zeros now were zeros
        # then), or a frozen layer's old gradient clipped again: GG101 if not zeros.
        again = [p for p in verdict.reapplied if id(p) in tentative]
        self._defer_zero(
            verdict.reapplied_changed + again + verdict.rewritten + verdict.assigned,
            functools.partial(
                self._rewritten,
                location,
                gg101,
                frozenset(map(id, verdict.reapplied_changed)),
                frozenset(map(id, again)),
                tentative,
                only_zeros_left,
            ),
        )
        self._defer_zero(verdict.maybe_zero, None)
        if self._schedule.queue:  # some check named above is still on the device: report after it
            self._schedule.defer(
                AFTER_PENDING,
                [],
                lambda _values, _alive: self._report(
                    "GG101", gg101.params(self._params), location, step
                ),
            )
        elif gg101.refs:
            self._report("GG101", gg101.params(self._params), location, step)
        if verdict.nothing_to_apply and self._unwatched:
            location.get()  # reported at the next step: where this one is, found now
            self._held_empty = (location, step)  # told apart at the next step: see _judge
        elif verdict.nothing_to_apply:
            self._report("GG103", [], location, step)
        self._unwatched = False

    def _report_held_empty(self, cleared: list[torch.Tensor]) -> None:
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
            self._report("GG102", cleared, location, step)
        else:
            self._report("GG103", [], location, step, _UNWATCHED_FIRST_STEP)

    def _uncertain(self, verdict: StepVerdict) -> list[torch.Tensor]:
        """The parameters GG101 would name whose applied content a pending check decides."""
        if not self._tentative:
            return []
        named = verdict.stale + verdict.reapplied + verdict.stale_changed
        return [p for p in named + verdict.reapplied_changed if id(p) in self._tentative]

    def _was_zeros(self, param: torch.Tensor, tentative: dict[int, int]) -> bool:
        """Whether the check that decided ``param``'s applied content found zeros."""
        step = tentative.get(id(param))
        return step is not None and self._found_zero.get(id(param)) == step

    def _stale_once_known(
        self, params: list[torch.Tensor], tentative: dict[int, int], gg101: _Stale
    ) -> None:
        """Gradients accumulated onto applied content are stale (GG101) once the checks
        still on the device have said the content was not zeros (judged after them)."""
        if not params:
            return

        def resolve(values: list[float], alive: list[torch.Tensor | None]) -> None:
            gg101.add([p for p in alive if p is not None and not self._was_zeros(p, tentative)])

        self._schedule.defer(AFTER_PENDING, params, resolve)

    def _stale_changed(
        self, location: Place, tentative: dict[int, int], gg101: _Stale, check: ZeroCheck
    ) -> None:
        """Stale, then changed in place: zeroed by a clear we cannot see, or clipped (GG101)."""
        if check.zero:
            self._unseen_clear(location, check)
        gg101.add([p for p in check.nonzero if not self._was_zeros(p, tentative)])

    def _changed(self, location: Place, check: ZeroCheck) -> None:
        """Fresh, then changed in place: all zero is a clear we cannot see, else a clip."""
        if check.complete and check.zero and not check.nonzero:
            self._unseen_clear(location, check)

    def _rewritten(
        self,
        location: Place,
        gg101: _Stale,
        frozen: frozenset[int],
        again: frozenset[int],
        tentative: dict[int, int],
        only_zeros_left: bool,
        check: ZeroCheck,
    ) -> None:
        """Written with no backward: an applied gradient again (a frozen layer's clipped
        again, or one re-applied as it was while a check of it was still on the device:
        GG101), new content written by hand, or zeros (GG103 if nothing else)."""
        nonzero = check.nonzero
        stale = [p for p in nonzero if id(p) in frozen and not self._was_zeros(p, tentative)]
        # Untouched since: all that can spare it is zeros (NaN is re-applied too).
        stale += [p for p in nonzero + check.unknown if id(p) in again]
        gg101.add(stale)
        for p in nonzero:
            slot = self._slots.get(id(p))
            if slot is not None and id(p) not in frozen | again:
                slot.mark_used()
        if only_zeros_left and check.complete and not nonzero:
            self._report("GG103", [], location, check.step)

    def _unseen_clear(self, location: Place, check: ZeroCheck) -> None:
        """Fresh gradients zeroed in place by something no wrapper sees: GG102 if a clear.

        A sanitising ``nan_to_num_`` leaves the same zeros when backward wrote
        NaN. The first time, the `FiniteProbe` is armed on one of these
        parameters; from then on, what backward wrote into it decides.
        """
        if check.finite is None:  # the probe watched none of them in this step's backward
            self._finite_probe.arm(min(check.zero, key=torch.Tensor.numel))
        elif check.finite == 1.0:
            self._report("GG102", check.zero, location, check.step)

    def _check_ranks(self, entries: Entries, location: Place) -> None:
        """GG401: compare what this step applies with the other ranks, one small collective.

        Not for FSDP: its ranks hold different shards by design. Every rank
        decides that alike, from its parameters, so none waits for the others.
        """
        params = [p for p, _ in entries]
        if self._sharded is None:
            self._sharded = any(map(is_sharded, params))
            if self._sharded:
                _log().warning(
                    "rank-check-skipped",
                    optimizer=self.optimizer,
                    note="check_ranks_every compares data-parallel replicas; FSDP shards "
                    "these parameters, so every rank holds different values: GG401 is off "
                    "for this optimizer",
                )
        if self._sharded:
            return
        exchange = start_rank_check([p.grad for p in params], self._step)
        if exchange is None:
            return
        step = self._step

        def resolve(values: list[float], alive: list[torch.Tensor | None]) -> None:
            found = compare_ranks(values, exchange.ranks)
            if found is None:
                return
            named = [p for p in (alive[i] for i in found.params) if p is not None]
            # A step or count mismatch is about the whole model, not some parameters.
            self._report("GG401", named or self._trainable(), location, step, found.detail)

        self._schedule.defer(exchange, params, resolve)

    def _judge_models(self, entries: Entries, verdict: StepVerdict, location: Place) -> None:
        """GG301-GG303: is every parameter really trained, by a model in train mode."""
        in_eval = self._models.in_eval(verdict.fresh)
        if in_eval:
            self._report("GG303", in_eval, location, self._step)
        if self._never_used and self._any_news(self._never_used):
            still = []
            for param, slot in self._never_used:
                if slot.used:
                    continue
                still.append((param, slot))
                if param.requires_grad and id(param) not in self._unused:
                    self._unused[id(param)] = (weakref.ref(param), self._step)
            self._never_used = still
        if self._unused:
            self._report_unused(final=False, location=location)
        if self._step % _UNOPTIMIZED_EVERY == 2 % _UNOPTIMIZED_EVERY:
            held = set(REGISTRY.watched())
            self._report("GG302", self._models.unoptimized(held), location, self._step)
            self._sight(held, location)

    def _sight(self, held: set[int], location: Place) -> None:
        """GG302 for modules gradguard was not told about: open a `Sighting`, or judge it."""
        global _SIGHTED
        sighting = self._sighting
        if sighting is None:
            if not _SIGHTED:
                _SIGHTED = True
                self._sighting = Sighting()
                self._sighting.look(self._models.models([]), held)
                if not self._sighting.candidates:
                    self._end_sighting()
            return
        found = sighting.confirm(held)
        self._end_sighting()
        if found:
            params = [p for p, _ in found]
            names = tuple(name for _, name in found)
            self._report("GG302", params, location, self._step, names=names)

    def _end_sighting(self) -> None:
        if self._sighting is not None:
            self._sighting.close()
            self._sighting = None

    @staticmethod
    def _any_news(never_used: Entries) -> bool:
        """Whether a never-used parameter was used, or is trainable, since (at C speed)."""
        return any(map(_USED, map(_SECOND, never_used))) or any(
            map(_REQUIRES_GRAD, map(_FIRST, never_used))
        )

    def _report_unused(self, final: bool, location: Place | None = None) -> None:
        due = []
        for key, (ref, born) in list(self._unused.items()):
            param = ref()
            slot = self._slots.get(key)
            if param is None or slot is None or slot.used:
                del self._unused[key]
            elif self._step - born + 1 >= self.options.unused_after:
                due.append(param)
                del self._unused[key]
        if due:
            where = location if location is not None else Place.at(Location("", 0))
            detail = f"in {self.options.unused_after} steps"
            self._report("GG301", due, where, self._step, detail)
        if final:
            self._unused.clear()

    def _check_numerics(
        self, opt: torch.optim.Optimizer, verdict: StepVerdict, location: Place
    ) -> None:
        """GG201/GG202 from one batched norm per step, read back without a sync.

        With ``record_norms`` the same norms are recorded, so the pass runs
        every step whatever the cadence. A step whose gradients were rescaled
        in place since backward (a clip) applies a bounded update: GG202 then
        judges the norms backward left (`BackwardNorms`, armed at the first
        such step), not the clipped ones.
        """
        params = verdict.with_grad
        tamed = bool(verdict.changed or verdict.stale_changed)
        raw = self._backward_norms.take() if self._backward_norms.armed else None
        if tamed and not self._backward_norms.armed and verdict.fresh:
            self._backward_norms.arm(verdict.fresh[0])
        self._backward_norms.window = max(1, verdict.micro_batches)
        if not self._cadence.due(params) and not self.options.record_norms:
            return
        grads: list[torch.Tensor] = list(map(_GRAD, params))
        # A fused optimizer under a GradScaler steps on still-scaled gradients;
        # the scaler leaves its scale and found-inf flag on the optimizer.
        scale = getattr(opt, "grad_scale", None)
        skipped = getattr(opt, "found_inf", None)
        readback = grad_norms(grads, scale, skipped)
        del grads  # never hold gradients past this call
        if readback is None:
            return
        step = self._step

        def resolve(values: list[float], params: list[torch.Tensor | None]) -> None:
            *norms, skip = values
            if self.options.record_norms and not skip:
                self._record_norms(params, norms, step)  # first: a strict finding raises
            if self.options.check_numerics:
                self._numerics(params, norms, skip != 0, step, location, explosion=not tamed)

        self._schedule.defer(readback, params, resolve)
        if tamed and raw is not None and self.options.check_numerics:
            self._check_raw(raw, step, location)

    def _check_raw(
        self,
        raw: tuple[Readback, list[weakref.ref[torch.Tensor]]],
        step: int,
        location: Place,
    ) -> None:
        """GG202 on the norms backward left, for a step that clipped them."""
        readback, refs = raw
        params = [r() for r in refs]
        alive = [p for p in params if p is not None]
        if len(alive) != len(params):
            return  # a parameter went away since backward: nothing to name it by

        def resolve(values: list[float], params: list[torch.Tensor | None]) -> None:
            norms = values[:-1]  # the trailing skipped-step flag is always 0 here
            why = self._norms.judge(math.hypot(*norms), tamed=True)
            if why is not None:
                top = [params[i] for i in largest_shares(norms)]
                self._report("GG202", [p for p in top if p is not None], location, step, why)

        self._schedule.defer(readback, alive, resolve)

    def _collect_raw(self) -> list[torch.Tensor] | None:
        """What `BackwardNorms` norms when a backward ends: if the next step checks, every
        parameter with a gradient."""
        params = [p for p, _ in self._cache if p.grad is not None]
        if self._closed or not params:
            return None
        return params if self._cadence.next_due(params) or self.options.record_norms else None

    def _numerics(
        self,
        params: list[torch.Tensor | None],
        norms: list[float],
        skipped: bool,
        step: int,
        location: Place,
        *,
        explosion: bool = True,
    ) -> None:
        if skipped:
            emit_info(
                "skipped-step", step=step, optimizer=self.optimizer, location=str(location.get())
            )
            return
        total = math.hypot(*norms)
        if not math.isfinite(total):
            bad = [p for p, n in zip(params, norms, strict=True) if not math.isfinite(n)]
            self._report("GG201", [p for p in bad if p is not None], location, step)
        why = self._norms.judge(total) if explosion else None
        if why is not None:
            top = [params[i] for i in largest_shares(norms)]
            self._report("GG202", [p for p in top if p is not None], location, step, why)

    def _record_norms(
        self, params: list[torch.Tensor | None], norms: list[float], step: int
    ) -> None:
        """Send the step's total and per-module gradient norms to the JSON logs."""
        if not has_record_sinks():
            return
        if self._module_norms is None or self._module_norms[0] is not self._cache:
            # A changed optimizer may reuse a freed parameter's id.
            self._module_norms = (self._cache, ModuleNorms())
        groups = self._module_norms[1]
        missing = groups.missing(params)
        if missing:
            groups.add(missing, self._names(missing))
        total, modules = groups.aggregate(params, norms)
        emit_record(
            {
                "event": "norms",
                "step": step,
                "optimizer": self.optimizer,
                "total": total,
                "modules": modules,
            }
        )

    def _defer_zero(
        self,
        params: list[torch.Tensor],
        judge: ZeroJudge | None,
        probe: tuple[int | None, torch.Tensor | None] = (None, None),
    ) -> bool:
        """Ask the device which of ``params``' gradients are exactly zero; judge once known.

        ``judge`` gets the parameters split by the answer; non-finite gradients
        are in neither list (GG201's business: clipping spreads one NaN over
        every gradient, zeros included). A zero gradient is remembered as
        applying nothing, so a backward onto it later is not stale. ``probe``,
        the `FiniteProbe`'s parameter and reading, is read back with them when
        that parameter is among ``params``. Returns whether it was judged now
        (also when there was nothing to ask).
        """
        if not params:
            return True
        key, reading = probe
        extra = reading if reading is not None and any(id(p) == key for p in params) else None
        grads = [p.grad for p in params if p.grad is not None]
        readback = zero_flags(grads, extra) if len(grads) == len(params) else None
        del grads  # never hold gradients past this call
        if readback is None:
            return True
        step = self._step
        count = len(params)

        def resolve(values: list[float], alive: list[torch.Tensor | None]) -> None:
            # 1.0 zero, 0.0 nonzero, NaN non-finite; then the probe's reading.
            flags = values[:count]
            finite = values[count] if extra is not None else None
            zero = [p for p, z in zip(alive, flags, strict=True) if z == 1 and p is not None]
            nonzero = [p for p, z in zip(alive, flags, strict=True) if z == 0 and p is not None]
            for p in alive:
                if p is not None and self._tentative.get(id(p)) == step:
                    del self._tentative[id(p)]
            for p in zero:
                if step == self._step:  # the step has not recorded what it applied yet
                    self._zero_applied.add(id(p))
                self._found_zero[id(p)] = step
                slot = self._slots.get(id(p))
                if slot is not None:
                    slot.found_zeros()
            if judge is not None:
                complete = len(zero) + len(nonzero) == count
                unknown = [p for p, z in zip(alive, flags, strict=True) if z != z and p is not None]
                judge(ZeroCheck(step, zero, nonzero, complete, finite, unknown))

        if self._schedule.defer(readback, params, resolve):
            return True
        for p in params:  # what this step applies is content until the device says
            self._tentative[id(p)] = step
        return False

    def _going_late(self) -> None:
        """A result is left for a later step: fix what it needs from this moment."""
        if self._place is not None:
            self._place.get()  # where the step is, found while it runs
        if self._fallback is None:  # the first result judged later: learn names now
            opt = self._opt_ref()
            self._fallback = fallback_names(opt.param_groups) if opt is not None else {}
            self._namer.prepare(self._params)

    def _report(
        self,
        code: str,
        params: list[torch.Tensor],
        location: Place,
        step: int,
        detail: str = "",
        names: tuple[str, ...] | None = None,
    ) -> None:
        """Report ``code`` for ``params``, named by the models unless ``names`` are given."""
        if code == "GG103":
            params = self._trainable()  # none of them got a gradient
        if not params:
            return
        where = location.get()
        if names is None:
            ids = tuple(id(p) for p in params)
            names = self._named.get(ids)
            if names is None:
                names = self._named[ids] = self._names(params)
        finding = make_finding(
            code,
            step=step,
            optimizer=self.optimizer,
            params=names,
            location=str(where),
            detail=detail,
        )
        self._reporter.report(finding, where.filename, where.lineno)

    def _trainable(self) -> list[torch.Tensor]:
        opt = self._opt_ref()
        groups = opt.param_groups if opt is not None else []
        return [p for g in groups for p in g["params"] if p.requires_grad]

    def _names(self, params: list[torch.Tensor]) -> tuple[str, ...]:
        opt = self._opt_ref()
        # Judged after the optimizer went: the group names learned before.
        fallback = fallback_names(opt.param_groups) if opt is not None else self._fallback or {}
        return self._namer.names(params, fallback)

    # -- tracking ------------------------------------------------------------

    def _entries(self, opt: torch.optim.Optimizer) -> Entries:
        """Pair each of the optimizer's parameters with its slot, tracking new ones.

        Cached while the optimizer holds the very same parameter objects (an
        identity check at C speed: ~25 us for 1,000 tensors, a tenth of looking
        every slot up again); per step only the parameters without a hook yet
        are revisited, to hook the unfrozen.
        """
        params = list(itertools.chain.from_iterable(map(_PARAMS, opt.param_groups)))
        cached = self._params
        if len(params) != len(cached) or not all(map(operator.is_, params, cached)):
            self._params = params
            self._cache = self._build_entries(opt)
            self._slot_list = [s for _, s in self._cache]
            self._probe_shared = True
            self._hook_fsdp = True
            self._sharded = None
            self._unhooked = [(p, s) for p, s in self._cache if s.handle is None]
            self._never_used = [(p, s) for p, s in self._cache if not s.used]
        elif self._unhooked and any(map(_REQUIRES_GRAD, map(_FIRST, self._unhooked))):
            for param, slot in self._unhooked:
                if param.requires_grad:
                    slot.hook_late(param)  # unfrozen since we last looked
            self._unhooked = [(p, s) for p, s in self._unhooked if s.handle is None]
        if self._hook_fsdp:
            self._hook_sharded(self._cache)
        return self._cache

    def _halves(self, entries: Entries) -> tuple[list[torch.Tensor], list[Slot]]:
        """``entries``' parameters and slots, as two lists in order (cached for the usual ones)."""
        if entries is self._cache:
            return self._params, self._slot_list
        return [p for p, _ in entries], [s for _, s in entries]

    def _hook_sharded(self, entries: Entries) -> None:
        """Hook FSDP2's unsharded and FSDP1's flat parameters for the slots they write to.

        FSDP2 creates an unsharded parameter at its first forward: until then
        this is tried again at every step and ``zero_grad()``.
        """
        params = [p for p, _ in entries]
        if not any(map(is_sharded, params)):
            self._hook_fsdp = False
            return
        found = sharded_sources(self._models.models(params))
        waiting = False
        for param, slot in entries:
            flat = found.flat.get(id(param))
            if flat is not None:
                slot.hook_sharded(flat, flat=True)
            elif id(param) in found.unsharded:
                unsharded = found.unsharded[id(param)]
                if unsharded is None:
                    waiting = True
                else:
                    slot.hook_sharded(unsharded, flat=False)
        self._hook_fsdp = waiting

    def _build_entries(self, opt: torch.optim.Optimizer) -> Entries:
        out: Entries = []
        slots = self._slots
        for group in opt.param_groups:
            param: torch.Tensor
            for param in group["params"]:
                slot = slots.get(id(param))
                if slot is None or slot.param_ref() is not param:
                    if slot is not None:
                        REGISTRY.release(slot, self._hook_failed)
                    slot = slots[id(param)] = REGISTRY.acquire(param, self._hook_failed)
                elif slot.handle is None and param.requires_grad:
                    slot.hook_late(param)
                out.append((param, slot))
        return out

    def _wrap(
        self, opt: torch.optim.Optimizer, name: str, *, before: str | None, after: str
    ) -> None:
        """Wrap ``opt.<name>`` to call our ``before`` and ``after`` methods around it.

        An instance attribute, never a class patch: ``Optimizer.__getstate__``
        drops it, so pickling and deepcopy see the plain optimizer. A failure
        in our part disables the guard and never changes the call's result.
        """
        prev = opt.__dict__.get(name)
        self._wrapped[name] = prev
        opt_ref = weakref.ref(opt)
        guard_ref = weakref.ref(self)
        original: Callable[..., Any] = prev if prev is not None else getattr(type(opt), name)
        where = f"the {name} wrapper"

        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            target = opt_ref()
            if prev is None:
                args = (target, *args)
            g = guard_ref()
            if before is not None and g is not None and target is not None and not g._closed:
                try:
                    getattr(g, before)(target)
                except Exception as exc:
                    g._fail(exc, where)
            result = original(*args, **kwargs)
            if g is None or target is None:
                return result
            if g._closed:
                g._sweep()  # a failure left hooks behind; outside a step it is safe
            else:
                try:
                    getattr(g, after)(target)
                except Exception as exc:
                    g._fail(exc, where)
            return result

        wrapper.__gradguard__ = self._token  # type: ignore[attr-defined]
        setattr(opt, name, wrapper)

    # -- lifecycle -----------------------------------------------------------

    def _detach(self, iterating: str | None = None, *, force: bool = False) -> None:
        """Remove every hook and wrapper, except step hooks torch may be iterating.

        ``iterating`` is ``"pre"`` or ``"post"`` when called from inside that
        step hook: removing an entry from the dict torch is looping over would
        raise ``OrderedDict mutated during iteration`` out of ``step()`` as
        soon as another hook follows ours. Such a hook stays, as a no-op,
        until `_sweep` runs at a safe point: our other step hook, the next
        ``zero_grad()`` outside a step, `close`, or the optimizer's
        collection. ``force`` removes everything now (the caller is about to
        raise out of torch's loop).
        """
        if self._closed:
            return
        self._closed = True
        STEPS.running()  # drop frames of steps that died raising: they hold their optimizer
        self._late.extend(reversed(self._handles))
        self._handles.clear()
        if force:
            self._sweep(force=True)
        elif iterating is not None:
            self._sweep("post" if iterating == "pre" else "pre")
        else:
            self._sweep()
        self._finite_probe.remove()
        self._backward_norms.remove()
        self._end_sighting()
        for slot in self._slots.values():
            REGISTRY.release(slot, self._hook_failed)
        if len(REGISTRY) == 0:  # the run is over: the next one looks again
            global _SIGHTED
            _SIGHTED = False
        self._slots.clear()
        self._cache, self._unhooked, self._never_used, self._params = [], [], [], []
        self._slot_list = []
        self._schedule.clear()
        self._unused.clear()
        self._current = None

    def _sweep(self, phase: str | None = None, *, force: bool = False) -> None:
        """Remove the step hooks left by `_detach` (only ``phase``'s when given).

        Without a phase, only when this thread runs no optimizer step: a
        ``zero_grad()`` called from another step hook must not edit the dicts
        torch is iterating. The ``zero_grad`` wrapper goes with the last hook,
        since it is what calls this in a loop that keeps running.
        """
        if self._late and phase is None and not force and _step_running():
            return
        keep = []
        for which, handle in self._late:
            if phase is None or which == phase:
                handle.remove()
            else:
                keep.append((which, handle))
        self._late = keep
        if not keep:
            self._unwrap()
            self._forget()

    def _forget(self) -> None:
        """Stop being the optimizer's guard; until then `unguard` finds us to finish closing."""
        opt = self._opt_ref()
        if opt is not None:
            with _LOCK:
                if _GUARDS.get(opt) is self:
                    del _GUARDS[opt]

    def _unwrap(self) -> None:
        """Put back what our method wrappers replaced, where they are still in place."""
        opt = self._opt_ref()
        if opt is None:
            return
        for name, prev in self._wrapped.items():
            current = opt.__dict__.get(name)
            if getattr(current, "__gradguard__", None) is self._token:
                if prev is None:
                    del opt.__dict__[name]
                else:
                    opt.__dict__[name] = prev

    def _optimizer_collected(self, _ref: object) -> None:
        # The optimizer is gone, its last steps' device results are not: judge
        # them (named by the models; nothing may raise out of a gc callback).
        try:
            self._schedule.drain(wait=True)
        except BaseException as exc:  # strict findings included: there is no step to raise from
            self._schedule.clear()
            if not isinstance(exc, _PROPAGATE):
                self._fail(exc, "the optimizer's collection")
        self._detach()
        self._late.clear()  # the hook dicts died with the optimizer

    def _hook_failed(self, exc: BaseException) -> None:
        self._fail(exc, "the post-accumulate hook")

    def _fail(self, exc: BaseException, where: str, iterating: str | None = None) -> None:
        """Disable this guard after an internal error; log it once, and raise it in strict mode.

        Never raises anything else: the user's step, backward or zero_grad goes
        on exactly as without gradguard.
        """
        if self._failed:
            return
        self._failed = True
        self._schedule.clear()
        try:
            # Strict mode raises out of torch's hook loop, which then never
            # steps its iterator again: removing our hook now is safe.
            self._detach(iterating, force=self.options.mode == "strict")
        except Exception as detach_exc:  # half-detached is still disabled
            self._closed = True
            where = f"{where} (then removing its hooks failed: {detach_exc!r})"
        self._reporter.internal_error(exc, where)
