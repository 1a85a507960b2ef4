"""`StepJudge`: every check of one optimizer's step, from its verdict to findings.

The guard (`_guard`) owns the hooks and calls `StepJudge.judge` once per step
with the step's `StepVerdict`; the judge runs the checks in order (the ranks,
the lifecycle, the accumulation window, the numerics, the model) and reports
what they find through the guard's ``report``. What only the device can tell
goes to the guard's `Schedule` with the resolver that judges it.
"""

from __future__ import annotations

import functools
import math
import operator
import weakref
from collections.abc import Callable

import torch

from gradguard._checks import StepVerdict, Windows
from gradguard._config import Options
from gradguard._dispatch import _log, emit_info, emit_record, has_record_sinks
from gradguard._foreign import LIVE, Foreign, Leak
from gradguard._health import (
    BackwardNorms,
    Cadence,
    ModuleNorms,
    NormHistory,
    Readback,
    grad_norms,
    largest_shares,
)
from gradguard._lifecycle import Entries, Lifecycle, Params
from gradguard._models import ModelWatch, Sighting
from gradguard._naming import Location, Place
from gradguard._process import Flag, keep
from gradguard._ranks import compare as compare_ranks
from gradguard._ranks import start as start_rank_check
from gradguard._schedule import AFTER_PENDING, Schedule
from gradguard._sharded import is_sharded
from gradguard._tracker import REGISTRY, Slot

Report = Callable[..., None]
"""The guard's ``_report(code, params, location, step, detail="", names=None)``."""

# How often the model-level check for parameters no optimizer holds runs.
_UNOPTIMIZED_EVERY = 25
# Whether a guard of this run (since the last time no guard was left) opened
# its `Sighting`: one per run, however many optimizers are guarded.
_SIGHTED = keep("sighting opened", Flag())

_REQUIRES_GRAD = operator.attrgetter("requires_grad")
_USED = operator.attrgetter("used")
_FIRST = operator.itemgetter(0)
_SECOND = operator.itemgetter(1)


class _Produced:
    """The total norm backward produced for one step: the applied one (``same``), or
    read from where backward ended (``None`` until read, or when unknown)."""

    __slots__ = ("same", "total")

    def __init__(self, *, same: bool) -> None:
        self.same = same
        self.total: float | None = None


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


class StepJudge:
    """Judges one optimizer's steps; owns every check's state between steps.

    Attributes:
        step: how many steps of the optimizer began (the one being judged).
        lifecycle: GG101-GG103 (`Lifecycle`, following `RULES`).
    """

    def __init__(
        self,
        options: Options,
        schedule: Schedule,
        report: Report,
        *,
        slots: dict[int, Slot],
        order: Callable[[], Params],
        models: ModelWatch,
        names: Callable[[Params], tuple[str, ...]],
        trainable: Callable[[], Params],
        label: str,
        on_error: Callable[[BaseException], None],
    ) -> None:
        self.options = options
        self.step = 0
        self._schedule = schedule
        self._report = report
        self._slots = slots
        self._models = models
        self._names = names
        self._trainable = trainable
        self._label = label
        self.lifecycle = Lifecycle(
            schedule, report, slots, order, strict=options.mode == "strict", on_error=on_error
        )
        self._windows = Windows(options.accumulation_steps)
        self._foreign = Foreign(label, slots)
        self._norms = NormHistory(options.explode_factor, options.max_grad_norm)
        self._cadence = Cadence(options.numerics_every)
        self._module_norms: tuple[Entries, ModuleNorms] | None = None
        self._backward_norms = BackwardNorms(self._collect_raw, on_error)
        self._entries: Entries = []
        self._never_used: Entries = []
        self._unused: dict[int, tuple[weakref.ref[torch.Tensor], int]] = {}
        self._sighting: Sighting | None = None  # GG302 beyond the known models
        self._sharded: bool | None = None  # whether FSDP shards the parameters (GG401)
        # The norm pass the step's zero check queued, for its numeric checks.
        self._shared: tuple[Params, Readback | None] | None = None
        self._closed = False

    def new_entries(self, entries: Entries) -> None:
        """The optimizer's parameters changed: these are its entries from now on."""
        self._entries = entries
        self._never_used = [(p, s) for p, s in entries if not s.used]
        self._sharded = None

    def judge(
        self, opt: torch.optim.Optimizer, entries: Entries, verdict: StepVerdict, location: Place
    ) -> None:
        """Every check of this step, in order; a strict finding raises out of here."""
        every = self.options.check_ranks_every
        if every is not None and self.step % every == 0:
            self._check_ranks(entries, location)  # first: every rank must take part
        if not verdict.trainable:
            return
        self.lifecycle.judge(verdict, location, self.step, functools.partial(self._norms_of, opt))
        window = self._windows.judge(verdict)
        if window is not None:
            self._report(window[0], window[1], location, self.step, window[2])
        if verdict.micro_batches > 1 or len(LIVE) > 1:  # GG106 needs one of them
            self._judge_foreign(verdict, location)
        if (self.options.check_numerics and verdict.with_grad) or self.options.record_norms:
            self._check_numerics(opt, verdict, location)
        self._shared = None
        self._judge_models(verdict, location)
        if self.options.mode == "strict":
            self._schedule.drain(wait=True)  # the step's results, read with one sync: raised here

    def finish(self) -> None:
        """At close: what only the end of the run can tell (GG301 still due)."""
        self.lifecycle.report_held_empty([])
        self.report_unused(final=True)

    def close(self) -> None:
        """Remove the checks' hooks and forget what they hold; idempotent."""
        self._closed = True
        self.lifecycle.close()
        self._foreign.close()
        self._backward_norms.remove()
        self._end_sighting()
        if len(REGISTRY) == 0:  # the run is over: the next one looks again
            _SIGHTED.value = False
        self._entries, self._never_used = [], []
        self._unused.clear()

    # -- GG106 ---------------------------------------------------------------

    def _judge_foreign(self, verdict: StepVerdict, location: Place) -> None:
        """GG106: does the step apply what a backward wrote for another update.

        Gradients changed in place since backward are judged once the step's
        zero check says they are not all zeros (a clear no wrapper saw leaves
        nothing of any backward).
        """
        parts = verdict.usual or verdict.rescaled
        if parts is not None:
            params, slots = parts[0], parts[1]
        else:
            params = [p for p in verdict.fresh if p.requires_grad and id(p) in self._slots]
            slots = [self._slots[id(p)] for p in params]
        leaks = self._foreign.judge(params, slots, verdict.micro_batches)
        if not leaks:
            return
        changed = {id(p) for p in (*verdict.changed, *verdict.stale_changed)}
        for leak in leaks:
            report = functools.partial(self._report_leak, leak, location, self.step)
            if any(id(p) in changed for p in leak.params):
                self.lifecycle.with_content(leak.params, self.step, report)
            else:
                report(leak.params)

    def _report_leak(self, leak: Leak, location: Place, step: int, params: Params) -> None:
        written = "" if leak.written_at is None else str(leak.written_at)
        self._report("GG106", params, location, step, leak.detail, written_at=written)

    # -- GG401 ---------------------------------------------------------------

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
                    optimizer=self._label,
                    note="check_ranks_every compares data-parallel replicas; FSDP shards "
                    "these parameters, so every rank holds different values: GG401 is off "
                    "for this optimizer",
                )
        if self._sharded:
            return
        exchange = start_rank_check([p.grad for p in params], self.step)
        if exchange is None:
            return
        step = self.step

        def resolve(values: list[float], alive: list[torch.Tensor | None]) -> None:
            found = compare_ranks(values, exchange.ranks)
            if found is None:
                return
            named = [p for p in (alive[i] for i in found.params) if p is not None]
            # A step or count mismatch is about the whole model, not some parameters.
            self._report("GG401", named or self._trainable(), location, step, found.detail)

        self._schedule.defer(exchange, params, resolve)

    # -- GG301-GG303 -----------------------------------------------------------

    def _judge_models(self, verdict: StepVerdict, location: Place) -> None:
        """GG301-GG303: is every parameter really trained, by a model in train mode."""
        in_eval = self._models.in_eval(verdict.fresh)
        if in_eval:
            self._report("GG303", in_eval, location, self.step)
        if self._never_used and self._any_news(self._never_used):
            still = []
            for param, slot in self._never_used:
                if slot.used:
                    continue
                still.append((param, slot))
                if param.requires_grad and id(param) not in self._unused:
                    self._unused[id(param)] = (weakref.ref(param), self.step)
            self._never_used = still
        if self._unused:
            self.report_unused(final=False, location=location)
        if self.step % _UNOPTIMIZED_EVERY == 2 % _UNOPTIMIZED_EVERY:
            held = set(REGISTRY.watched())
            self._report("GG302", self._models.unoptimized(held), location, self.step)
            self._sight(held, location)

    def _sight(self, held: set[int], location: Place) -> None:
        """GG302 for modules gradguard was not told about: open a `Sighting`, or judge it."""
        sighting = self._sighting
        if sighting is None:
            if not _SIGHTED.value:
                _SIGHTED.value = True
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
            self._report("GG302", params, location, self.step, names=names)

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

    def report_unused(self, final: bool, location: Place | None = None) -> None:
        """GG301 for the parameters unused for ``unused_after`` steps; at the end, forget."""
        due = []
        for key, (ref, born) in list(self._unused.items()):
            param = ref()
            slot = self._slots.get(key)
            if param is None or slot is None or slot.used:
                del self._unused[key]
            elif self.step - born + 1 >= self.options.unused_after:
                due.append(param)
                del self._unused[key]
        if due:
            where = location if location is not None else Place.at(Location("", 0))
            detail = f"in {self.options.unused_after} steps"
            self._report("GG301", due, where, self.step, detail)
        if final:
            self._unused.clear()

    # -- GG201/GG202 -----------------------------------------------------------

    def _check_numerics(
        self, opt: torch.optim.Optimizer, verdict: StepVerdict, location: Place
    ) -> None:
        """GG201/GG202 from one batched norm per step, read back without a sync.

        With ``record_norms`` the same norms are recorded, so the pass runs
        every step whatever the cadence. A step whose gradients were rescaled
        in place since backward (a clip) applies a bounded update: GG202 then
        judges the norms backward left (`BackwardNorms`, armed at the first
        such step), not the clipped ones; recorded, they are what backward
        produced, next to what the step applied.
        """
        params = verdict.with_grad
        record = self.options.record_norms
        tamed = bool(verdict.changed or verdict.stale_changed)
        raw = self._backward_norms.take() if self._backward_norms.armed else None
        # What backward produced differs from what the step applies only on a step
        # that is not usual (a clip, a clear): recording, norm backward's from then on.
        unusual = tamed or (record and verdict.usual is None)
        written = verdict.fresh or verdict.cleared or params
        if unusual and not self._backward_norms.armed and written:
            self._backward_norms.arm(written[0])
        self._backward_norms.window = max(1, verdict.micro_batches)
        produced = self._produced(raw, verdict) if record else None
        if not params:  # recording only: the step applies nothing
            if produced is not None:
                self._defer_record(produced, self.step)
            return
        if not self._cadence.due(params) and not record:
            return
        shared, self._shared = self._shared, None
        if shared is not None and shared[0] is params:
            readback = shared[1]
        else:
            # A fused optimizer under a GradScaler steps on still-scaled gradients;
            # the scaler leaves its scale and found-inf flag on the optimizer.
            scale, skipped = getattr(opt, "grad_scale", None), getattr(opt, "found_inf", None)
            readback = grad_norms(params, scale, skipped)
        if readback is None:
            return
        step = self.step

        def resolve(values: list[float], params: list[torch.Tensor | None]) -> None:
            *norms, skip = values
            if produced is not None and not skip:
                self._record_norms(params, norms, step, produced)  # first: a strict finding raises
            if self.options.check_numerics:
                self._numerics(params, norms, skip != 0, step, location, explosion=not tamed)

        self._schedule.defer(readback, params, resolve)
        if tamed and raw is not None and self.options.check_numerics:
            self._check_raw(raw, step, location)

    def _norms_of(self, opt: torch.optim.Optimizer, params: Params) -> Readback | None:
        """Queue the norm pass over ``params``' gradients; the step's numeric checks reuse it."""
        scale, skipped = getattr(opt, "grad_scale", None), getattr(opt, "found_inf", None)
        readback = grad_norms(params, scale, skipped)
        self._shared = (params, readback)
        return readback

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
        params = [p for p, _ in self._entries if p.grad is not None]
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
                "skipped-step", step=step, optimizer=self._label, location=str(location.get())
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

    def _produced(
        self, raw: tuple[Readback, list[weakref.ref[torch.Tensor]]] | None, verdict: StepVerdict
    ) -> _Produced:
        """What backward produced for this step, for its norms record.

        On a usual step the very gradients the step applies; otherwise the
        norms `BackwardNorms` took where backward ended, once they are read
        (queued now, so they are known before the step's own norms are), or
        unknown (the first such step, before it was armed).
        """
        produced = _Produced(same=verdict.usual is not None)
        if raw is None or produced.same:
            return produced
        readback, refs = raw
        alive = [p for p in (r() for r in refs) if p is not None]

        def resolve(values: list[float], _params: list[torch.Tensor | None]) -> None:
            produced.total = _finite(math.hypot(*values[: len(refs)]))

        self._schedule.defer(readback, alive, resolve)
        return produced

    def _defer_record(self, produced: _Produced, step: int) -> None:
        """The norms record of a step that applies nothing, once what it produced is known."""

        def resolve(_values: list[float], _params: list[torch.Tensor | None]) -> None:
            self._record_norms([], [], step, produced)

        self._schedule.defer(AFTER_PENDING, [], resolve)

    def _record_norms(
        self,
        params: list[torch.Tensor | None],
        norms: list[float],
        step: int,
        produced: _Produced,
    ) -> None:
        """Send the step's total and per-module gradient norms to the JSON logs, and the
        total backward produced for it."""
        if not has_record_sinks():
            return
        if not params:
            emit_record(
                {
                    "event": "norms",
                    "step": step,
                    "optimizer": self._label,
                    "total": 0.0,
                    "produced": produced.total,
                    "modules": {},
                }
            )
            return
        if self._module_norms is None or self._module_norms[0] is not self._entries:
            # A changed optimizer may reuse a freed parameter's id.
            self._module_norms = (self._entries, ModuleNorms())
        groups = self._module_norms[1]
        missing = groups.missing(params)
        if missing:
            groups.add(missing, self._names(missing))
        total, modules = groups.aggregate(params, norms)
        emit_record(
            {
                "event": "norms",
                "step": step,
                "optimizer": self._label,
                "total": total,
                "produced": total if produced.same else produced.total,
                "modules": modules,
            }
        )
