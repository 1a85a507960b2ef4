"""`Guard`: attaches to one optimizer, owns its hooks, turns verdicts into findings."""

from __future__ import annotations

import contextlib
import functools
import itertools
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
from gradguard._health import DeviceFlag, all_zero
from gradguard._naming import Location, ParamNamer, fallback_names, user_location
from gradguard._session import session_defaults
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
    """A device-side verdict not read back yet, with what is needed to report it."""

    __slots__ = ("flag", "location", "on_nonzero", "on_zero", "params", "step")

    def __init__(
        self,
        flag: DeviceFlag,
        step: int,
        location: Location,
        params: list[torch.Tensor],
        on_zero: str | None,
        on_nonzero: str | None,
    ) -> None:
        self.flag = flag
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
        self._step = 0
        self._judge_next = judge_first_step
        self._closed = False
        self._failed = False
        self._handles: list[RemovableHandle] = []
        self._zero_grad_prev: Any = None
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
            for param, slot in entries:
                slot.on_applied(param)
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
        if verdict.changed:
            self._defer(verdict.changed, location, on_zero="GG102", on_nonzero=None)
        if not verdict.any_fresh and verdict.reapplied_changed:
            self._defer(verdict.reapplied_changed, location, on_zero="GG103", on_nonzero="GG101")
        if verdict.nothing_to_apply:
            self._report("GG103", [], location, self._step)

    def _defer(
        self,
        params: list[torch.Tensor],
        location: Location,
        on_zero: str | None,
        on_nonzero: str | None,
    ) -> None:
        grads = [p.grad for p in params if p.grad is not None]
        flag = all_zero(grads)
        del grads  # never hold gradients past this call
        if flag is None:
            return
        pending = _Pending(flag, self._step, location, params, on_zero, on_nonzero)
        if self.mode == "strict" or flag.ready():
            self._resolve(pending)
        else:
            self._pending.append(pending)

    def _drain(self, wait: bool) -> None:
        keep = []
        for pending in self._pending:
            if wait or pending.flag.ready():
                self._resolve(pending)
            else:
                keep.append(pending)
        self._pending = keep

    def _resolve(self, pending: _Pending) -> None:
        code = pending.on_zero if pending.flag.value() else pending.on_nonzero
        if code is None:
            return
        params = [p for p in (r() for r in pending.params) if p is not None]
        self._report(code, [] if code == "GG103" else params, pending.location, pending.step)

    def _report(self, code: str, params: list[torch.Tensor], location: Location, step: int) -> None:
        if not params and code != "GG103":
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

    def _names(self, params: list[torch.Tensor]) -> tuple[str, ...]:
        opt = self._opt_ref()
        fallback = fallback_names(opt.param_groups) if opt is not None else {}
        return self._namer.names(params, fallback)

    # -- tracking ------------------------------------------------------------

    def _entries(self, opt: torch.optim.Optimizer) -> Entries:
        """Pair each of the optimizer's parameters with its slot, tracking new ones."""
        out: Entries = []
        slots = self._slots
        for group in opt.param_groups:
            param: torch.Tensor
            for param in group["params"]:
                slot = slots.get(id(param))
                if slot is None or slot.param_ref() is not param:
                    if slot is not None:
                        REGISTRY.release(slot)
                    slot = slots[id(param)] = REGISTRY.acquire(param, self._hook_failed)
                elif slot.handle is None and param.requires_grad:
                    slot.hook(param)  # unfrozen since we last looked
                out.append((param, slot))
        return out

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
    mode: str | None = None,
    ignore: Iterable[str] | None = None,
    judge_first_step: bool = True,
) -> Guard:
    """Validate the arguments and return the optimizer's guard, creating it if needed.

    ``mode`` and ``ignore`` left as ``None`` come from the active `install`
    session (the runner, the pytest plugin), else ``"warn"`` and nothing.
    """
    opt = _check_optimizer(optimizer)
    default_mode, default_ignore = session_defaults()
    checked_mode = validate_mode(default_mode if mode is None else mode)
    codes = default_ignore if ignore is None else validate_codes(ignore)
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
    mode: str | None = None,
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
            Omitted, it is the mode of ``gradguard run``, `gradguard.install`
            or the pytest plugin when one is active, else ``"warn"``.
        ignore: finding codes to silence, e.g. ``["GG103"]``; omitted, the
            active session's.

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
    mode: str | None = None,
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
