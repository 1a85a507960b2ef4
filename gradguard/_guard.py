"""`Guard`: attaches to one optimizer, owns its hooks, turns verdicts into findings."""

from __future__ import annotations

import contextlib
import functools
import itertools
import operator
import sys
import threading
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from gradguard._checks import StepVerdict, judge_step
from gradguard._dispatch import Mode, Reporter, SummaryRow, validate_codes, validate_mode
from gradguard._exceptions import GradGuardError
from gradguard._findings import Finding, make_finding
from gradguard._health import zero_flags
from gradguard._naming import Location, ParamNamer, fallback_names, user_location
from gradguard._tracker import REGISTRY, Slot

OptimizerT = TypeVar("OptimizerT", bound=torch.optim.Optimizer)
Entries = list[tuple[torch.Tensor, Slot]]
Args = tuple[Any, ...]
Kwargs = dict[str, Any]

_GUARDS: weakref.WeakKeyDictionary[torch.optim.Optimizer, Guard] = weakref.WeakKeyDictionary()
_LABELS: defaultdict[str, itertools.count[int]] = defaultdict(itertools.count)
_LOCK = threading.Lock()


class _StepStack(threading.local):
    """The optimizer steps running in this thread, as ids of their frames.

    A step that starts while another is running (``super().step()``, a
    Lookahead or SAM wrapper stepping its base optimizer) is part of that
    outer step: one update, judged once.
    """

    def __init__(self) -> None:
        self.frames: list[int] = []

    def running(self) -> bool:
        """Whether a step is running in this thread, dropping steps that died raising."""
        if not self.frames:
            return False
        live = set()
        frame = sys._getframe(1)
        while frame is not None:
            live.add(id(frame))
            frame = frame.f_back  # type: ignore[assignment]
        self.frames = [f for f in self.frames if f in live]
        return bool(self.frames)


_STEPS = _StepStack()


class _Pending:
    """A device-side verdict not read back yet, with what is needed to report it.

    ``flag`` holds one "exactly zero" result per parameter when ``each``,
    else one for all of them; zero ones are reported as ``on_zero``, the
    others as ``on_nonzero`` (``None``: nothing to report).
    """

    __slots__ = ("each", "flag", "location", "on_nonzero", "on_zero", "params", "step")

    def __init__(
        self,
        params: list[torch.Tensor],
        *,
        each: bool,
        step: int,
        location: Location,
        on_zero: str | None,
        on_nonzero: str | None,
    ) -> None:
        grads = [p.grad for p in params if p.grad is not None]
        self.flag = zero_flags(grads, each=each) if len(grads) == len(params) else None
        del grads  # never hold gradients past this call
        self.each = each
        self.step = step
        self.location = location
        # Parameters, not gradients: naming them later must not keep grads alive.
        self.params = [weakref.ref(p) for p in params]
        self.on_zero = on_zero
        self.on_nonzero = on_nonzero


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
        mode: Mode,
        ignore: frozenset[str],
        judge_first_step: bool = True,
    ) -> None:
        self.mode: Mode = mode
        self.optimizer: str = (
            f"{type(optimizer).__name__}#{next(_LABELS[type(optimizer).__name__])}"
        )
        self._reporter = Reporter(mode, ignore)
        self._namer = ParamNamer(models)
        self._opt_ref = weakref.ref(optimizer, self._optimizer_collected)
        self._slots: dict[int, Slot] = {}
        self._seen: dict[tuple[str, Location, tuple[int, ...]], Finding] = {}
        self._pending: list[_Pending] = []
        self._current: Entries | None = None
        self._zero_applied: set[int] = set()  # params this step applies as all-zero
        self._step = 0
        self._judge_next = judge_first_step
        self._closed = False
        self._failed = False
        self._handles: list[RemovableHandle] = []
        self._zero_grad_prev: Any = None
        # What `_entries` built last, reused while the optimizer holds the very
        # same parameter objects, and the positions still without a hook. The
        # optimizer holds these parameters too; any change rebuilds the lists.
        self._known: Entries = []
        self._known_params: list[torch.Tensor] = []
        self._known_unhooked: list[int] = []
        self._entries(optimizer)
        self._handles.append(optimizer.register_step_pre_hook(self._pre_hook))
        self._handles.append(optimizer.register_step_post_hook(self._post_hook))
        self._wrap_zero_grad(optimizer)

    # -- public --------------------------------------------------------------

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
        """Whether the guard has removed its hooks."""
        return self._closed

    def summary(self) -> list[SummaryRow]:
        """Per finding code: count, first step, first location and the fix."""
        return self._reporter.summary()

    def close(self) -> None:
        """Report pending results, then remove every hook and wrapper; idempotent."""
        if self._closed:
            return
        try:
            self._drain(wait=True)
        finally:
            self._detach()

    # -- hooks ---------------------------------------------------------------

    def _pre_hook(
        self, opt: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        if self._closed:
            return
        frame = id(sys._getframe(1))
        try:
            self._before_step(opt, args, kwargs)
        except GradGuardError:
            raise  # strict mode: the step does not run, so it is not pushed
        except Exception as exc:
            self._fail(exc, "the step pre-hook")
        _STEPS.frames.append(frame)

    def _post_hook(
        self, opt: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        if _STEPS.frames:
            _STEPS.frames.pop()
        if self._closed:
            return
        try:
            entries = self._current if self._current is not None else self._entries(opt)
            self._current = None
            zero_applied, self._zero_applied = self._zero_applied, set()
            for param, slot in entries:
                slot.on_applied(param)
            if zero_applied:
                for param, slot in entries:
                    if id(param) in zero_applied:
                        slot.applied = False
        except Exception as exc:
            self._fail(exc, "the step post-hook")

    def _before_step(
        self, opt: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        if _STEPS.running():
            self._current = None
            return  # nested in another step: one update, judged by the outer step
        self._step += 1
        self._drain(wait=False)
        entries = self._current = self._entries(opt)
        closure = args[1] if len(args) > 1 else kwargs.get("closure")
        judge, self._judge_next = self._judge_next, True
        if judge and closure is None:
            # With a closure (LBFGS, SAM) backward runs inside the step.
            self._judge(judge_step(entries))

    def _on_zero_grad(self, opt: torch.optim.Optimizer) -> None:
        inside_step = bool(_STEPS.frames) and _STEPS.running()
        for param, slot in self._entries(opt):
            slot.on_clear(param, inside_step)

    # -- judging -------------------------------------------------------------

    def _judge(self, verdict: StepVerdict) -> None:
        if not verdict.trainable:
            return
        location = user_location()
        self._report("GG101", verdict.stale + verdict.reapplied, location, self._step)
        self._report("GG102", verdict.cleared, location, self._step)
        # Gradients changed in place since we saw them: a clip leaves them
        # nonzero, a clear we could not see leaves zeros. Ask the device.
        self._defer(verdict.stale_changed, location, each=True, on_zero="GG102", on_nonzero="GG101")
        self._defer(verdict.changed, location, each=False, on_zero="GG102", on_nonzero=None)
        only_zeros_left = not (
            verdict.any_fresh or verdict.stale or verdict.reapplied or verdict.cleared
        )
        self._defer(
            verdict.reapplied_changed,
            location,
            each=True,
            on_zero="GG103" if only_zeros_left else None,
            on_nonzero="GG101",
        )
        if verdict.nothing_to_apply:
            self._report("GG103", [], location, self._step)

    def _defer(
        self,
        params: list[torch.Tensor],
        location: Location,
        *,
        each: bool,
        on_zero: str | None,
        on_nonzero: str | None,
    ) -> None:
        if not params:
            return
        pending = _Pending(
            params,
            each=each,
            step=self._step,
            location=location,
            on_zero=on_zero,
            on_nonzero=on_nonzero,
        )
        if pending.flag is None:
            return
        if self.mode == "strict" or pending.flag.ready():
            self._resolve(pending)
        else:
            self._pending.append(pending)

    def _drain(self, wait: bool) -> None:
        keep = []
        for pending in self._pending:
            if wait or (pending.flag is not None and pending.flag.ready()):
                self._resolve(pending)
            else:
                keep.append(pending)
        self._pending = keep

    def _resolve(self, pending: _Pending) -> None:
        assert pending.flag is not None
        values = pending.flag.values()
        params = [r() for r in pending.params]
        if not pending.each:
            values = values * len(params)
        zero = [p for p, z in zip(params, values, strict=True) if z and p is not None]
        nonzero = [p for p, z in zip(params, values, strict=True) if not z and p is not None]
        for p in zero:
            # The step applied zeros: a backward onto them later is not stale.
            if pending.step == self._step:
                self._zero_applied.add(id(p))
            slot = self._slots.get(id(p))
            if slot is not None:
                slot.applied = slot.stale = False
        for code, group in ((pending.on_zero, zero), (pending.on_nonzero, nonzero)):
            if code is not None and group:
                self._report(code, group, pending.location, pending.step)

    def _report(self, code: str, params: list[torch.Tensor], location: Location, step: int) -> None:
        if code == "GG103":
            params = self._trainable()  # none of them got a gradient
        if not params:
            return
        key = (code, location, tuple(id(p) for p in params))
        finding = self._seen.get(key)
        if finding is None:
            finding = make_finding(
                code,
                step=step,
                optimizer=self.optimizer,
                params=self._names(params),
                location=str(location),
            )
            self._seen[key] = finding
        self._reporter.report(finding, location.filename, location.lineno)

    def _trainable(self) -> list[torch.Tensor]:
        opt = self._opt_ref()
        groups = opt.param_groups if opt is not None else []
        return [p for g in groups for p in g["params"] if p.requires_grad]

    def _names(self, params: list[torch.Tensor]) -> tuple[str, ...]:
        opt = self._opt_ref()
        fallback = fallback_names(opt.param_groups) if opt is not None else {}
        return self._namer.names(params, fallback)

    # -- tracking ------------------------------------------------------------

    def _entries(self, opt: torch.optim.Optimizer) -> Entries:
        """Pair each of the optimizer's parameters with its slot, tracking new ones.

        The list is shared between calls: callers must not change it.
        """
        params: list[torch.Tensor] = list(
            itertools.chain.from_iterable(group["params"] for group in opt.param_groups)
        )
        known = self._known_params
        # Called twice per step: an identity check at C speed costs a tenth of
        # looking every slot up again (1,000 tensors: ~25 us instead of ~0.3 ms).
        if len(params) == len(known) and all(map(operator.is_, params, known)):
            if self._known_unhooked:
                self._hook_unfrozen()
            return self._known
        out: Entries = []
        slots = self._slots
        for param in params:
            slot = slots.get(id(param))
            if slot is None or slot.param_ref() is not param:
                if slot is not None:
                    REGISTRY.release(slot)
                slot = slots[id(param)] = REGISTRY.acquire(param, self._hook_failed)
            elif slot.handle is None and param.requires_grad:
                slot.hook(param)  # unfrozen since we last looked
            out.append((param, slot))
        self._known = out
        self._known_params = params
        self._known_unhooked = [i for i, (_, slot) in enumerate(out) if slot.handle is None]
        return out

    def _hook_unfrozen(self) -> None:
        still = []
        for i in self._known_unhooked:
            param, slot = self._known[i]
            if param.requires_grad:
                slot.hook(param)  # unfrozen since we last looked
            if slot.handle is None:
                still.append(i)
        self._known_unhooked = still

    def _wrap_zero_grad(self, opt: torch.optim.Optimizer) -> None:
        # An instance attribute, never a class patch: Optimizer.__getstate__
        # drops it, so pickling and deepcopy see the plain optimizer.
        prev = opt.__dict__.get("zero_grad")
        self._zero_grad_prev = prev
        opt_ref = weakref.ref(opt)
        guard_ref = weakref.ref(self)
        original: Callable[..., Any] = prev if prev is not None else type(opt).zero_grad

        @functools.wraps(original)
        def zero_grad(*args: Any, **kwargs: Any) -> Any:
            target = opt_ref()
            result = (
                original(*args, **kwargs) if prev is not None else original(target, *args, **kwargs)
            )
            g = guard_ref()
            if g is not None and target is not None and not g._closed:
                try:
                    g._on_zero_grad(target)
                except Exception as exc:
                    g._fail(exc, "the zero_grad wrapper")
            return result

        zero_grad.__gradguard__ = True  # type: ignore[attr-defined]
        opt.zero_grad = zero_grad  # type: ignore[method-assign]

    # -- lifecycle -----------------------------------------------------------

    def _detach(self) -> None:
        if self._closed:
            return
        self._closed = True
        for handle in reversed(self._handles):
            handle.remove()
        self._handles.clear()
        opt = self._opt_ref()
        if opt is not None:
            current = opt.__dict__.get("zero_grad")
            if getattr(current, "__gradguard__", False):
                if self._zero_grad_prev is None:
                    del opt.__dict__["zero_grad"]
                else:
                    opt.__dict__["zero_grad"] = self._zero_grad_prev
            with _LOCK:
                if _GUARDS.get(opt) is self:
                    del _GUARDS[opt]
        for slot in self._slots.values():
            REGISTRY.release(slot)
        self._slots.clear()
        self._known = []
        self._known_params = []
        self._known_unhooked = []
        self._pending.clear()
        self._current = None

    def _optimizer_collected(self, _ref: object) -> None:
        self._pending.clear()  # nothing left to name or report against
        self._detach()

    def _hook_failed(self, exc: BaseException) -> None:
        self._fail(exc, "the post-accumulate hook")

    def _fail(self, exc: BaseException, where: str) -> None:
        if self._failed:
            return
        self._failed = True
        self._pending.clear()
        self._detach()
        self._reporter.internal_error(exc, where)


def _models(model: nn.Module | Iterable[nn.Module] | None) -> list[nn.Module]:
    if model is None:
        return []
    if isinstance(model, nn.Module):
        return [model]
    if isinstance(model, (str, bytes)) or not isinstance(model, Iterable):
        raise TypeError(f"model must be an nn.Module or a list of them; got {type(model).__name__}")
    models = list(model)
    for m in models:
        if not isinstance(m, nn.Module):
            raise TypeError(
                "model must be an nn.Module or a list of them; "
                f"got an item of type {type(m).__name__}"
            )
    return models


def _check_optimizer(optimizer: object) -> torch.optim.Optimizer:
    if isinstance(optimizer, nn.Module):
        raise TypeError(
            f"guard() takes the optimizer, not the model ({type(optimizer).__name__}); "
            "use guard(torch.optim.SGD(model.parameters(), ...), model=model)"
        )
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            "guard() needs a torch.optim.Optimizer; "
            f"got {type(optimizer).__name__} ({optimizer!r:.60})"
        )
    if not hasattr(optimizer, "_optimizer_step_pre_hooks"):
        raise TypeError(
            f"{type(optimizer).__name__} never called torch.optim.Optimizer.__init__, so its step "
            "cannot be hooked; guard the optimizer it wraps instead"
        )
    return optimizer


def attach(
    optimizer: object,
    *,
    model: nn.Module | Iterable[nn.Module] | None = None,
    mode: str = "warn",
    ignore: Iterable[str] | None = None,
    judge_first_step: bool = True,
) -> Guard:
    """Validate the arguments and return the optimizer's guard, creating it if needed."""
    opt = _check_optimizer(optimizer)
    checked_mode = validate_mode(mode)
    codes = validate_codes(ignore)
    models = _models(model)
    with _LOCK:
        existing = _GUARDS.get(opt)
        if existing is not None and not existing.closed:
            return existing
        g = Guard(
            opt, models=models, mode=checked_mode, ignore=codes, judge_first_step=judge_first_step
        )
        _GUARDS[opt] = g
    return g


def guard(
    optimizer: OptimizerT,
    *,
    model: nn.Module | Iterable[nn.Module] | None = None,
    mode: str = "warn",
    ignore: Iterable[str] | None = None,
) -> OptimizerT:
    """Watch ``optimizer`` for gradient-handling bugs and return it unchanged.

    Args:
        optimizer: any ``torch.optim.Optimizer``; the same object comes back.
        model: the module (or modules) owning the parameters, for names such
            as ``encoder.0.weight``; found automatically on the first finding
            when omitted.
        mode: ``"warn"`` (a `GradGuardWarning` plus a log event), ``"strict"``
            (raise a `GradGuardError` at the step) or ``"log"`` (log event only).
        ignore: finding codes to silence, e.g. ``["GG103"]``.

    Raises:
        TypeError: ``optimizer`` is not an optimizer (a model, ``None``, ...).
        ValueError: unknown ``mode`` or finding code.
    """
    attach(optimizer, model=model, mode=mode, ignore=ignore)
    return optimizer


@contextlib.contextmanager
def guarding(
    optimizer: torch.optim.Optimizer,
    *,
    model: nn.Module | Iterable[nn.Module] | None = None,
    mode: str = "warn",
    ignore: Iterable[str] | None = None,
) -> Iterator[Guard]:
    """Guard ``optimizer`` inside a ``with`` block; every hook is removed on exit, even on error.

    Yields the `Guard`, whose ``findings`` and ``summary()`` stay readable
    after the block. An optimizer that was already guarded keeps its guard.
    """
    opt = _check_optimizer(optimizer)
    owned = _GUARDS.get(opt) is None
    g = attach(opt, model=model, mode=mode, ignore=ignore)
    try:
        yield g
    finally:
        if owned:
            g.close()


def unguard(optimizer: torch.optim.Optimizer) -> Guard | None:
    """Report anything pending, remove every hook from ``optimizer`` and return its guard."""
    g = _GUARDS.get(optimizer)
    if g is not None:
        g.close()
    return g


def guard_of(optimizer: torch.optim.Optimizer) -> Guard | None:
    """The live guard watching ``optimizer``, if any."""
    g = _GUARDS.get(optimizer)
    return None if g is None or g.closed else g
