"""`Guard`: attaches to one optimizer, owns its hooks, turns verdicts into findings."""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import sys
import threading
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from gradguard._checks import StepVerdict, Windows, judge_step
from gradguard._config import Options, make_options
from gradguard._dispatch import Reporter, SummaryRow, emit_info
from gradguard._exceptions import GradGuardError
from gradguard._findings import Finding, make_finding
from gradguard._health import (
    Cadence,
    NormHistory,
    Readback,
    grad_norms,
    largest_shares,
    zero_flags,
)
from gradguard._integrations import accumulation_steps as framework_accumulation
from gradguard._integrations import unwrap
from gradguard._models import ModelWatch
from gradguard._naming import Location, ParamNamer, fallback_names, user_location
from gradguard._ranks import Exchange
from gradguard._ranks import compare as compare_ranks
from gradguard._ranks import start as start_rank_check
from gradguard._session import session_defaults
from gradguard._tracker import REGISTRY, STEPS, Slot

OptimizerT = TypeVar("OptimizerT", bound=torch.optim.Optimizer)
Entries = list[tuple[torch.Tensor, Slot]]
Args = tuple[Any, ...]
Kwargs = dict[str, Any]
Refs = list[weakref.ref[torch.Tensor]]

_GUARDS: weakref.WeakKeyDictionary[torch.optim.Optimizer, Guard] = weakref.WeakKeyDictionary()
_LABELS: defaultdict[str, itertools.count[int]] = defaultdict(itertools.count)
_LOCK = threading.Lock()
# How often the model-level check for parameters no optimizer holds runs.
_UNOPTIMIZED_EVERY = 25


Resolver = Callable[[list[float], list["torch.Tensor | None"]], None]


class _Pending:
    """A device-side result not read back yet, the parameters it is about, and its use."""

    __slots__ = ("params", "readback", "resolve")

    def __init__(self, readback: Readback | Exchange, params: Refs, resolve: Resolver) -> None:
        self.readback = readback
        # Parameters, not gradients: naming them later must not keep grads alive.
        self.params = params
        self.resolve = resolve


def _refs(params: list[torch.Tensor]) -> Refs:
    return [weakref.ref(p) for p in params]


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
        self._opt_ref = weakref.ref(optimizer, self._optimizer_collected)
        self._slots: dict[int, Slot] = {}
        self._shape: list[tuple[int, int]] = []
        self._cache: Entries = []
        self._unhooked: Entries = []
        self._never_used: Entries = []
        self._unused: dict[int, tuple[weakref.ref[torch.Tensor], int]] = {}
        self._named: dict[tuple[int, ...], tuple[str, ...]] = {}  # naming is not free
        self._pending: list[_Pending] = []
        self._current: Entries | None = None
        self._zero_applied: set[int] = set()  # params this step applies as all-zero
        self._step = 0
        self._judge_next = judge_first_step
        self._judge_after: int | None = None  # frame of a closure step judged when it returns
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
            self._report_unused(final=True)
        finally:
            self._detach()

    # -- hooks ---------------------------------------------------------------

    def _pre_hook(self, opt: torch.optim.Optimizer, args: Args, kwargs: Kwargs) -> None:
        if self._closed:
            return
        frame = id(sys._getframe(1))
        try:
            if self._before_step(opt, args, kwargs):
                self._judge_after = frame
        except GradGuardError:
            raise  # strict mode: the step does not run, so it is not pushed
        except Exception as exc:
            self._fail(exc, "the step pre-hook")
        STEPS.frames.append(frame)

    def _post_hook(self, opt: torch.optim.Optimizer, args: Args, kwargs: Kwargs) -> None:
        if STEPS.frames:
            STEPS.frames.pop()
        if self._closed:
            return
        error: GradGuardError | None = None
        try:
            entries = self._current if self._current is not None else self._entries(opt)
            self._current = None
            if self._judge_after is not None and self._judge_after == id(sys._getframe(1)):
                self._judge_after = None
                try:
                    self._judge(opt, entries)
                except GradGuardError as exc:
                    error = exc  # strict mode: raise once the step is recorded
            if STEPS.inside():
                return  # nested: the outer step records what it applied, once judged
            zero_applied, self._zero_applied = self._zero_applied, set()
            for param, slot in entries:
                slot.on_applied(param)
                if id(param) in zero_applied:
                    slot.applied = False
        except Exception as exc:
            self._fail(exc, "the step post-hook")
        if error is not None:
            raise error

    def _before_step(self, opt: torch.optim.Optimizer, args: Args, kwargs: Kwargs) -> bool:
        """Count and judge a step about to run; true when it is judged when it returns.

        A step given a closure (LBFGS, SAM, every step PyTorch Lightning takes)
        may run backward and zero_grad inside itself, so what it applies is
        only known once it returns.
        """
        if STEPS.running():
            self._current = None
            return False  # nested in another step: one update, judged by the outer step
        self._step += 1
        self._drain(wait=False)
        entries = self._current = self._entries(opt)
        closure = args[1] if len(args) > 1 else kwargs.get("closure")
        judge, self._judge_next = self._judge_next, True
        if not judge:
            return False
        if closure is not None:
            return True
        self._judge(opt, entries)
        return False

    def _on_zero_grad(self, opt: torch.optim.Optimizer) -> None:
        inside_step = STEPS.inside()
        for param, slot in self._entries(opt):
            slot.on_clear(param, inside_step)

    # -- judging -------------------------------------------------------------

    def _judge(self, opt: torch.optim.Optimizer, entries: Entries) -> None:
        every = self.options.check_ranks_every
        if every is not None and self._step % every == 0:
            self._check_ranks(entries)  # first: every rank must take part, whatever it finds
        verdict = judge_step(entries)
        if not verdict.trainable:
            return
        location = user_location()
        self._judge_lifecycle(verdict, location)
        window = self._windows.judge(verdict)
        if window is not None:
            self._report(window[0], window[1], location, self._step, window[2])
        if self.options.check_numerics and verdict.with_grad:
            self._check_numerics(opt, verdict.with_grad, location)
        self._judge_models(entries, verdict, location)

    def _judge_lifecycle(self, verdict: StepVerdict, location: Location) -> None:
        """GG101-GG103: was this step's gradient made, kept and cleared at the right time."""
        self._report("GG101", verdict.stale + verdict.reapplied, location, self._step)
        self._report("GG102", verdict.cleared, location, self._step)
        # Gradients changed in place since we saw them: a clip leaves them
        # nonzero, a clear we could not see leaves zeros. Ask the device.
        self._defer_zero(verdict.stale_changed, location, "GG102", "GG101", each=True)
        self._defer_zero(verdict.changed, location, "GG102", None, each=False)
        only_zeros_left = not (
            verdict.any_fresh or verdict.stale or verdict.reapplied or verdict.cleared
        )
        on_zero = "GG103" if only_zeros_left else None
        self._defer_zero(verdict.reapplied_changed, location, on_zero, "GG101", each=True)
        if verdict.nothing_to_apply:
            self._report("GG103", [], location, self._step)

    def _check_ranks(self, entries: Entries) -> None:
        """GG401: compare what this step applies with the other ranks, one small collective."""
        params = [p for p, _ in entries]
        exchange = start_rank_check([p.grad for p in params], self._step)
        if exchange is None:
            return
        location = user_location()
        step = self._step

        def resolve(values: list[float], alive: list[torch.Tensor | None]) -> None:
            found = compare_ranks(values, exchange.ranks)
            if found is None:
                return
            named = [p for p in (alive[i] for i in found.params) if p is not None]
            # A step or count mismatch is about the whole model, not some parameters.
            self._report("GG401", named or self._trainable(), location, step, found.detail)

        self._defer(exchange, params, resolve)

    def _judge_models(self, entries: Entries, verdict: StepVerdict, location: Location) -> None:
        """GG301-GG303: is every parameter really trained, by a model in train mode."""
        self._report("GG303", self._models.in_eval(verdict.fresh), location, self._step)
        if self._never_used:
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

    def _report_unused(self, final: bool, location: Location | None = None) -> None:
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
            where = location if location is not None else Location("", 0)
            detail = f"in {self.options.unused_after} steps"
            self._report("GG301", due, where, self._step, detail)
        if final:
            self._unused.clear()

    def _check_numerics(
        self, opt: torch.optim.Optimizer, params: list[torch.Tensor], location: Location
    ) -> None:
        """GG201/GG202 from one batched norm per step, read back without a sync."""
        if not self._cadence.due():
            return
        # A fused optimizer under a GradScaler steps on still-scaled gradients;
        # the scaler leaves its scale and found-inf flag on the optimizer.
        scale = getattr(opt, "grad_scale", None)
        skipped = getattr(opt, "found_inf", None)
        with self._cadence.timed():
            readback = grad_norms([p.grad for p in params], scale, skipped)  # type: ignore[misc]
        if readback is None:
            return
        step = self._step

        def resolve(values: list[float], params: list[torch.Tensor | None]) -> None:
            *norms, skip = values
            self._numerics(params, norms, skip != 0, step, location)

        self._defer(readback, params, resolve)

    def _numerics(
        self,
        params: list[torch.Tensor | None],
        norms: list[float],
        skipped: bool,
        step: int,
        location: Location,
    ) -> None:
        if skipped:
            emit_info("skipped-step", step=step, optimizer=self.optimizer, location=str(location))
            return
        bad = [p for p, n in zip(params, norms, strict=True) if not math.isfinite(n)]
        self._report("GG201", [p for p in bad if p is not None], location, step)
        why = self._norms.judge(math.sqrt(sum(n * n for n in norms)))
        if why is not None:
            top = [params[i] for i in largest_shares(norms)]
            self._report("GG202", [p for p in top if p is not None], location, step, why)

    def _defer_zero(
        self,
        params: list[torch.Tensor],
        location: Location,
        on_zero: str | None,
        on_nonzero: str | None,
        *,
        each: bool,
    ) -> None:
        """Report ``params`` as ``on_zero`` or ``on_nonzero`` once the device says which."""
        if not params:
            return
        grads = [p.grad for p in params if p.grad is not None]
        readback = zero_flags(grads, each=each) if len(grads) == len(params) else None
        del grads  # never hold gradients past this call
        if readback is None:
            return
        step = self._step

        def resolve(values: list[float], alive: list[torch.Tensor | None]) -> None:
            flags = values if each else values * len(alive)
            zero = [p for p, z in zip(alive, flags, strict=True) if z and p is not None]
            nonzero = [p for p, z in zip(alive, flags, strict=True) if not z and p is not None]
            for p in zero:
                # The step applied zeros: a backward onto them later is not stale.
                if step == self._step:
                    self._zero_applied.add(id(p))
                slot = self._slots.get(id(p))
                if slot is not None:
                    slot.applied = slot.stale = False
            for code, group in ((on_zero, zero), (on_nonzero, nonzero)):
                if code is not None and group:
                    self._report(code, group, location, step)

        self._defer(readback, params, resolve)

    def _defer(
        self, readback: Readback | Exchange, params: list[torch.Tensor], resolve: Resolver
    ) -> None:
        """Resolve now when the values are readable (CPU) or must be (strict), else later."""
        if self.options.mode == "strict" or readback.ready():
            resolve(readback.values(), list(params))
        else:
            self._pending.append(_Pending(readback, _refs(params), resolve))

    def _drain(self, wait: bool) -> None:
        keep = []
        for pending in self._pending:
            if wait or pending.readback.ready():
                alive = [r() for r in pending.params]
                pending.resolve(pending.readback.values(), alive)
            else:
                keep.append(pending)
        self._pending = keep

    def _report(
        self,
        code: str,
        params: list[torch.Tensor],
        location: Location,
        step: int,
        detail: str = "",
    ) -> None:
        if code == "GG103":
            params = self._trainable()  # none of them got a gradient
        if not params:
            return
        ids = tuple(id(p) for p in params)
        names = self._named.get(ids)
        if names is None:
            names = self._named[ids] = self._names(params)
        finding = make_finding(
            code,
            step=step,
            optimizer=self.optimizer,
            params=names,
            location=str(location),
            detail=detail,
        )
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

        Cached while the param groups keep their lists and lengths
        (``add_param_group`` or appending to a group rebuilds it); per step only
        the parameters without a hook yet are looked at, to hook the unfrozen.
        """
        shape = [(id(g["params"]), len(g["params"])) for g in opt.param_groups]
        if shape != self._shape:
            self._shape = shape
            self._cache = self._build_entries(opt)
            self._unhooked = [(p, s) for p, s in self._cache if s.handle is None]
            self._never_used = [(p, s) for p, s in self._cache if not s.used]
        elif self._unhooked:
            for param, slot in self._unhooked:
                if param.requires_grad:
                    slot.hook(param)  # unfrozen since we last looked
            self._unhooked = [(p, s) for p, s in self._unhooked if s.handle is None]
        return self._cache

    def _build_entries(self, opt: torch.optim.Optimizer) -> Entries:
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
                    slot.hook(param)
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
            if prev is None:
                args = (target, *args)
            result = original(*args, **kwargs)
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
        self._cache, self._unhooked, self._never_used, self._shape = [], [], [], []
        self._pending.clear()
        self._unused.clear()
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
    optimizer = unwrap(optimizer)  # Accelerate's and Lightning's wrappers: guard what they wrap
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
    **options: Any,
) -> Guard:
    """Validate the arguments and return the optimizer's guard, creating it if needed.

    ``mode`` and ``ignore`` left as ``None`` come from the active `install`
    session (the runner, the pytest plugin), else ``"warn"`` and nothing.
    """
    opt = _check_optimizer(optimizer)
    if options.get("accumulation_steps") is None:
        options["accumulation_steps"] = framework_accumulation(opt)
    default_mode, default_ignore = session_defaults()
    checked = make_options(
        mode=default_mode if mode is None else mode,
        ignore=default_ignore if ignore is None else ignore,
        **options,
    )
    models = _models(model)
    with _LOCK:
        existing = _GUARDS.get(opt)
        if existing is not None and not existing.closed:
            return existing
        g = Guard(opt, models=models, options=checked, judge_first_step=judge_first_step)
        _GUARDS[opt] = g
    return g


def guard(
    optimizer: OptimizerT,
    *,
    model: nn.Module | Iterable[nn.Module] | None = None,
    mode: str | None = None,
    ignore: Iterable[str] | None = None,
    accumulation_steps: int | None = None,
    check_numerics: bool = True,
    numerics_every: int | None = None,
    explode_factor: float = 10.0,
    max_grad_norm: float | None = None,
    unused_after: int = 20,
    check_ranks_every: int | None = None,
) -> OptimizerT:
    """Watch ``optimizer`` for gradient-handling bugs and return it unchanged.

    Args:
        optimizer: any ``torch.optim.Optimizer``; the same object comes back.
        model: the module (or modules) owning the parameters, for names such
            as ``encoder.0.weight`` and the model-level checks; found
            automatically when omitted.
        mode: ``"warn"`` (a `GradGuardWarning` plus a log event), ``"strict"``
            (raise a `GradGuardError` at the step) or ``"log"`` (log event only).
            Omitted, it is the mode of ``gradguard run``, `gradguard.install`
            or the pytest plugin when one is active, else ``"warn"``.
        ignore: finding codes to silence, e.g. ``["GG103"]``; omitted, the
            active session's.
        accumulation_steps: micro-batches per step, if you accumulate on
            purpose; enables GG104 instead of GG105.
        check_numerics: run the non-finite (GG201) and exploding (GG202)
            checks, one batched norm per step on the device.
        numerics_every: run them every this many steps; by default every
            step, unless that would cost over 2% of the time between steps
            (hundreds of small tensors on a CPU), then as often as fits.
        explode_factor: GG202 fires when the total gradient norm reaches this
            multiple of its running median.
        max_grad_norm: GG202 also fires above this absolute total norm.
        unused_after: steps after which a parameter that never received a
            gradient is reported (GG301).
        check_ranks_every: under ``torch.distributed``, every this many steps
            compare a fingerprint of the gradients about to be applied across
            ranks, with one small collective, and report ranks that disagree
            (GG401). Off by default; for data-parallel replicas (DDP), not
            sharded training.

    Raises:
        TypeError: ``optimizer`` is not an optimizer (a model, ``None``, ...),
            or an option has the wrong type.
        ValueError: unknown ``mode`` or finding code, or an out-of-range option.
    """
    attach(
        optimizer,
        model=model,
        mode=mode,
        ignore=ignore,
        accumulation_steps=accumulation_steps,
        check_numerics=check_numerics,
        numerics_every=numerics_every,
        explode_factor=explode_factor,
        max_grad_norm=max_grad_norm,
        unused_after=unused_after,
        check_ranks_every=check_ranks_every,
    )
    return optimizer


@contextlib.contextmanager
def guarding(
    optimizer: torch.optim.Optimizer,
    *,
    model: nn.Module | Iterable[nn.Module] | None = None,
    mode: str | None = None,
    ignore: Iterable[str] | None = None,
    accumulation_steps: int | None = None,
    check_numerics: bool = True,
    numerics_every: int | None = None,
    explode_factor: float = 10.0,
    max_grad_norm: float | None = None,
    unused_after: int = 20,
    check_ranks_every: int | None = None,
) -> Iterator[Guard]:
    """Guard ``optimizer`` inside a ``with`` block; every hook is removed on exit, even on error.

    Takes the same arguments as `guard`. Yields the `Guard`, whose
    ``findings`` and ``summary()`` stay readable after the block. An optimizer
    that was already guarded keeps its guard.
    """
    opt = _check_optimizer(optimizer)
    owned = _GUARDS.get(opt) is None
    g = attach(
        opt,
        model=model,
        mode=mode,
        ignore=ignore,
        accumulation_steps=accumulation_steps,
        check_numerics=check_numerics,
        numerics_every=numerics_every,
        explode_factor=explode_factor,
        max_grad_norm=max_grad_norm,
        unused_after=unused_after,
        check_ranks_every=check_ranks_every,
    )
    try:
        yield g
    finally:
        if owned:
            g.close()


def unguard(optimizer: torch.optim.Optimizer) -> Guard | None:
    """Report anything pending, remove every hook from ``optimizer`` and return its guard."""
    g = _GUARDS.get(_key(optimizer))
    if g is not None:
        g.close()
    return g


def guard_of(optimizer: torch.optim.Optimizer) -> Guard | None:
    """The live guard watching ``optimizer``, if any."""
    g = _GUARDS.get(_key(optimizer))
    return None if g is None or g.closed else g


def _key(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    inner = unwrap(optimizer)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer
