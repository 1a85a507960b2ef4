"""`Guard`: attaches to one optimizer, owns its hooks and wrappers and their removal.

It sees the step's events (backward through the tracker's hooks, the
``zero_grad`` wrapper, the step hooks), sorts a step into its verdict, and
hands it to its `StepJudge`; it names what the judge reports and contains
every failure of its own.
"""

from __future__ import annotations

import functools
import itertools
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

from gradguard._checks import StepVerdict, judge_step
from gradguard._compiled import RUN_CODE, hook_caller, untraced
from gradguard._config import Options
from gradguard._dispatch import Reporter
from gradguard._exceptions import GradGuardError, GradGuardWarning
from gradguard._findings import Finding, make_finding
from gradguard._health import LATENESS
from gradguard._judge import StepJudge
from gradguard._models import ModelWatch
from gradguard._naming import ParamNamer, Place, fallback_names, user_location
from gradguard._process import keep, keep_with
from gradguard._schedule import Schedule
from gradguard._sharded import is_sharded
from gradguard._sharded import sources as sharded_sources
from gradguard._tally import SummaryRow
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
    process_group_up,
)

Entries = list[tuple[torch.Tensor, Slot]]
Args = tuple[Any, ...]
Kwargs = dict[str, Any]

_PROPAGATE = (GradGuardError, GradGuardWarning)
"""What a hook lets through: a strict finding, or a warning the user's filters made an error."""


def _close_guards() -> None:
    """Close every live guard, whatever it raises (the reset of `_GUARDS`, for tests)."""
    for guard in list(_GUARDS.values()):
        try:
            guard.close()
        except Exception:  # a strict finding judged at close, or a guard that failed
            guard._detach(force=True)
    _GUARDS.clear()


_GUARDS: weakref.WeakKeyDictionary[torch.optim.Optimizer, Guard] = keep_with(
    "guards", weakref.WeakKeyDictionary(), _close_guards, len
)
_LABELS: defaultdict[str, itertools.count[int]] = keep(
    "optimizer labels", defaultdict(itertools.count), cache=True
)
_LOCK = threading.Lock()

_PARAMS = operator.itemgetter("params")
_REQUIRES_GRAD = operator.attrgetter("requires_grad")
_FIRST = operator.itemgetter(0)


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
        self._opt_ref = weakref.ref(optimizer, self._optimizer_collected)
        self._slots: dict[int, Slot] = {}
        self._params: list[torch.Tensor] = []
        self._cache: Entries = []
        self._slot_list: list[Slot] = []  # the cache's slots, in order
        self._unhooked: Entries = []
        self._named: dict[tuple[int, ...], tuple[str, ...]] = {}  # naming is not free
        self._schedule = Schedule(self._going_late)
        self._judge = StepJudge(
            options,
            self._schedule,
            self._report,
            slots=self._slots,
            order=lambda: self._params,
            models=self._models,
            names=self._names,
            trainable=self._trainable,
            label=self.optimizer,
            on_error=self._hook_failed,
        )
        self._fallback: dict[int, str] | None = None  # group names, for after the optimizer
        self._current: Entries | None = None
        self._usual: Split | None = None  # the step running, judged usual: `mark_applied`
        self._place: Place | None = None  # where the step being judged is
        self._probe_shared = True  # look for gradients in shared buffers at the next step
        self._hook_fsdp = True  # look for what FSDP's autograd writes to (see `_sharded`)
        self._judge_next = judge_first_step
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
            self._judge.finish()
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
        REGISTRY.distributed = process_group_up()  # a step: is a process group up now?
        entries = self._current if self._current is not None else self._entries(opt)
        self._current = None
        usual, self._usual = self._usual, None
        error: BaseException | None = None
        if self._judge_after is not None and self._judge_after == wrapper:
            self._judge_after = None
            try:
                self._judge_step(opt, entries)
            except _PROPAGATE as exc:
                error = exc
        if STEPS.frames and STEPS.running():
            return error  # nested: the outer step records what it applied, once judged
        # `_halves`, with its usual case inline: one call fewer at every step.
        params, slots = (
            (self._params, self._slot_list) if entries is self._cache else self._halves(entries)
        )
        mark_applied(entries, params, slots, usual=usual)
        lifecycle = self._judge.lifecycle
        if lifecycle.applying is not None or lifecycle.pending:
            lifecycle.applied(entries, self._judge.step)
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
        self._judge.step += 1
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
            return self._judge.lifecycle.first_step_unwatched(entries)
        if closure is not None:
            return True
        verdict = judge_step(entries, self._params, self._slot_list)
        if not verdict.usual and verdict.nothing_new:
            # Nothing new to apply yet: the step may make its own gradients
            # (GSAM's set_closure, any optimizer holding its closure).
            return True
        self._usual = verdict.usual if verdict.usual is not None else verdict.rescaled
        self._judge_step(opt, entries, verdict)
        return False

    def _before_zero_grad(self, opt: torch.optim.Optimizer) -> None:
        # Hook parameters unfrozen since the last step before their gradients
        # go, so a backward that wrote to them counts as thrown away.
        self._entries(opt)

    def _on_zero_grad(self, opt: torch.optim.Optimizer) -> None:
        REGISTRY.distributed = process_group_up()  # a clear: is a process group up now?
        # `_before_zero_grad` brought the entries up to date a moment ago.
        inside = bool(STEPS.frames) and STEPS.running()
        if mark_cleared(self._cache, self._slot_list, inside) and not inside:
            # Backward's gradients thrown away: where, for the story of a finding.
            self._judge.lifecycle.cleared(user_location(2), REGISTRY.backward_at)

    def _on_add_param_group(self, opt: torch.optim.Optimizer) -> None:
        self._entries(opt)

    # -- judging -------------------------------------------------------------

    def _judge_step(
        self, opt: torch.optim.Optimizer, entries: Entries, verdict: StepVerdict | None = None
    ) -> None:
        self._place = Place()
        try:
            if verdict is None:
                verdict = judge_step(entries, *self._halves(entries))
            self._judge.judge(opt, entries, verdict, self._place)
        finally:
            self._place = None

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
        *,
        written_at: str = "",
        cleared_at: str = "",
    ) -> None:
        """Report ``code`` for ``params``, named by the models unless ``names`` are given;
        ``written_at`` and ``cleared_at`` tell a lifecycle finding's story."""
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
            written_at=written_at,
            cleared_at=cleared_at,
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
            self._unhooked = [(p, s) for p, s in self._cache if s.handle is None]
            self._judge.new_entries(self._cache)
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
        for slot in self._slots.values():
            REGISTRY.release(slot, self._hook_failed)
        self._slots.clear()
        self._judge.close()  # after the slots: the last guard of a run leaves none
        self._models.close()
        self._cache, self._unhooked, self._params, self._slot_list = [], [], [], []
        self._schedule.clear()
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
