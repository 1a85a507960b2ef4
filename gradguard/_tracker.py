"""Per-parameter gradient lifecycle: written by backward, applied by a step, cleared.

One `Slot` per parameter, shared by every guard that watches the parameter, so a
clear seen through one optimizer counts for all of them. Slots never hold a
gradient (that would stop AccumulateGrad from stealing the incoming buffer):
only a weak reference and the tensor's version counter.

The post-accumulate hook is the hot path: per parameter and per backward it
compares one weak reference and one version number and bumps a counter.

Two things can change a gradient in place after that hook and before the
backward pass returns: DistributedDataParallel's reducer (it averages the
gradient, and with ``gradient_as_bucket_view=True`` swaps ``.grad`` for a view
into its bucket), and other hooks. Their work is part of producing the
gradient, so under ``torch.distributed`` (and for gradients in shared buffers)
each slot written by a backward is re-read when that backward ends
(`_Backward`); a single process with ordinary gradients pays nothing for it.
Gradients that live in one buffer (DDP buckets, contiguous gradient buffers,
the slices a ``torch.cat`` of parameters leaves) share one version counter, so
the version arithmetic that tells "accumulated onto" from "changed in place"
is done once per buffer instead of per gradient (`_Backward.shared`). Such
slots are found at the first step (`learn_shared`), or by the first write
whose version jumped (`Slot.shared`).

Fully sharded training (`_sharded`) goes through the same paths: FSDP2's
DTensor gradients are read through their local shard and both version
counters, and the hooks of what autograd really writes to (FSDP2's unsharded
parameters, FSDP1's flat parameters) feed the slots of the parameters the
optimizer holds (`Slot.hook_sharded`).
"""

from __future__ import annotations

import functools
import operator
import sys
import threading
import weakref
from collections.abc import Callable
from itertools import compress, repeat
from types import FrameType
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from gradguard._naming import Location, user_location
from gradguard._process import keep
from gradguard._sharded import is_dtensor, local, version_of

_TENSOR = torch.Tensor
# The hook's one allocation, by a name tests can make fail (fault containment).
_ref = weakref.ref

# The per-step passes over every parameter run these at C speed (`moved`).
_GRAD = operator.attrgetter("grad")
_VERSION = operator.attrgetter("_version")
_REF = operator.attrgetter("ref")
_SEEN_VERSION = operator.attrgetter("version")
_FRESH = operator.attrgetter("fresh")
_STALE = operator.attrgetter("stale")
_LOST = operator.attrgetter("lost")
_DISCARDED = operator.attrgetter("discarded")
_PARAM_REF = operator.attrgetter("param_ref")
_HANDLE = operator.attrgetter("handle")
_USED = operator.attrgetter("used")
_PARAM_VERSION = operator.attrgetter("param_version")
_REQUIRES_GRAD = operator.attrgetter("requires_grad")
_LAYOUT = operator.attrgetter("layout")
_DEREF = weakref.ref.__call__

ErrorHandler = Callable[[BaseException], None]


class _StepStack(threading.local):
    """The optimizer steps running in this thread, as torch's step-wrapper frames.

    A step that starts while another is running (``super().step()``, a
    Lookahead or SAM wrapper stepping its base optimizer) is part of that
    outer step: one update, judged once.

    The frames are held, not their ids: a step that dies raising (the user's
    own hook, the optimizer's body) never pops its frame, and a later frame
    reusing a dead one's id would look like a step still running, so every
    following step would be skipped as nested. Held frames live until they
    are found off the stack.
    """

    def __init__(self) -> None:
        self.frames: list[FrameType] = []

    def push(self, frame: FrameType) -> None:
        """A step whose wrapper runs in ``frame`` started."""
        self.frames.append(frame)

    def pop(self, frame: FrameType) -> None:
        """The step whose wrapper runs in ``frame`` ended (no-op if never pushed)."""
        for i in range(len(self.frames) - 1, -1, -1):
            if self.frames[i] is frame:
                del self.frames[i]
                return

    def running(self) -> bool:
        """Whether a step is running in this thread, dropping steps that died raising."""
        if not self.frames:
            return False
        live = set()
        frame: FrameType | None = sys._getframe(1)
        while frame is not None:
            live.add(id(frame))
            frame = frame.f_back
        self.frames = [f for f in self.frames if id(f) in live]
        return bool(self.frames)

    def inside(self) -> bool:
        """Whether this thread is inside an optimizer step (cheap when it is not)."""
        return bool(self.frames) and self.running()

    def clear(self) -> None:
        """Forget this thread's steps (a reset for tests)."""
        self.frames = []


STEPS = keep("steps", _StepStack(), size=lambda steps: len(steps.frames))

_graph_task_id: Callable[[], int] = torch._C._current_graph_task_id
_ENGINE: Any = torch.autograd.Variable._execution_engine
_compiling: Callable[[], bool] = getattr(torch.compiler, "is_compiling", None) or (
    torch._utils.is_compiling  # torch < 2.3
)
_distributed: Callable[[], bool] = (
    torch.distributed.is_initialized if torch.distributed.is_available() else lambda: False
)
process_group_up = _distributed
"""Whether a process group is up: the guard sets ``REGISTRY.distributed`` from it at each
step and clear, inline (one call fewer each)."""


class _Backward:
    """What one backward pass wrote: its slots, re-read when the pass ends.

    Attributes:
        slots: slots whose post-accumulate hook ran in this pass.
        shared: for gradients that are views into one buffer, keyed by the
            buffer and the version all their slots last recorded, whether the
            first of them written in this pass found the buffer untouched since.
    """

    __slots__ = ("shared", "slots")

    def __init__(self) -> None:
        self.slots: list[Slot] = []
        self.shared: dict[tuple[int, int], bool] = {}


# Bounded (see `_backward`): passes that raised, or ran compiled, never ran their callbacks.
_BACKWARDS: dict[int, _Backward] = keep("backward passes", {}, cache=True)
# Verdicts for hooks that run outside any graph task we can attach to.
_LOOSE = _Backward()


def _current_backward() -> _Backward:
    """The record of the backward pass running now, created with its end-of-pass callback."""
    task = _graph_task_id()
    record = _BACKWARDS.get(task)
    if record is not None:
        return record
    if task < 0:
        if len(_LOOSE.shared) > 4096:
            _LOOSE.shared.clear()
        return _LOOSE
    if len(_BACKWARDS) > 256:
        _BACKWARDS.clear()  # passes that raised never ran their callbacks
    record = _BACKWARDS[task] = _Backward()
    # DDP writes the averaged gradients from an end-of-pass callback it queues
    # after ours; only then must ours run again behind it.
    requeue = _distributed()
    try:
        _ENGINE.queue_callback(functools.partial(_backward_ended, task, requeue))
    except RuntimeError:  # no callbacks here (a compiled backward): keep the loose record
        del _BACKWARDS[task]
        return _LOOSE
    return record


def _backward_ended(task: int, requeue: bool) -> None:
    """Re-read every slot the pass wrote, after every other end-of-pass callback."""
    if requeue:
        # DDP queues its callback at its last bucket, after ours: queueing
        # again runs us after it.
        _ENGINE.queue_callback(functools.partial(_backward_ended, task, False))
        return
    record = _BACKWARDS.pop(task, None)
    if record is None:
        return
    for slot in record.slots:
        slot.resync()


class Slot:
    """What gradguard knows about one parameter's ``.grad``.

    Attributes:
        ref: weak reference to the gradient object last seen, or ``None``.
        version: that object's version counter (`version_of`) when last seen.
        fresh: backward accumulations since the last step or clear.
        stale: the gradient holds a contribution a step already applied.
        applied: the last thing that happened was a step applying ``ref``.
        discarded: accumulations that a clear threw away before any step.
        lost: backward results thrown away since the last step, by any clear,
            counting only clears outside a step of gradients no step used.
        used: the parameter has ever received a gradient: from backward, or
            written by hand and applied by a step.
        since: the backward pass (`Registry.passes`) that began the
            gradient's window, the passes accumulated since the last step or
            clear (0: one gradguard did not see).
        last: the latest backward pass that wrote into it.
        modes: the modes of the models (`Registry.mode`) in the window's
            passes, or-ed: ``TRAIN | EVAL`` when a pass in eval mode and one
            in train mode were accumulated together (GG106).
        shared: its gradients live in a buffer shared with other gradients
            (views, or slices of one ``torch.cat`` of parameters), whose
            writes all move one version counter.
        pending: FSDP2 backward passes into the unsharded gradient that no
            reduce-scatter has written into ``.grad`` yet (unsynced micro-batches).
        address: FSDP1: where the gradient a backward left starts in memory,
            ``None`` for other slots. FSDP1 replaces ``.grad`` after every
            forward by a new view of the same memory and version counter.
    """

    __slots__ = (
        "__weakref__",
        "address",
        "applied",
        "discarded",
        "finalizer",
        "fresh",
        "handle",
        "inner",
        "key",
        "last",
        "lost",
        "modes",
        "on_error",
        "param_ref",
        "param_version",
        "pending",
        "ref",
        "shared",
        "since",
        "stale",
        "used",
        "users",
        "version",
    )

    def __init__(self, param: torch.Tensor) -> None:
        self.param_ref = weakref.ref(param)
        self.key = id(param)
        # One handler per guard sharing the slot: a failure disables every one
        # of them, since each would go on judging the same broken state.
        self.on_error: list[ErrorHandler] = []
        self.handle: RemovableHandle | None = None
        # The hook on what autograd writes for this parameter under FSDP.
        self.inner: RemovableHandle | None = None
        self.pending = 0
        self.address: int | None = None
        self.finalizer: weakref.finalize[Any, Any] | None = None
        self.users = 0
        self.stale = False
        self.applied = False
        self.discarded = 0
        self.lost = 0
        self.used = False
        self.shared = False
        self.since = self.last = self.modes = 0
        self.param_version = param._version
        grad = param.grad
        # A gradient that exists before we watch came from a backward we did
        # not see; count it as fresh so the first step is not misjudged.
        self.ref: weakref.ref[torch.Tensor] | None = None
        self.version = -1
        self.fresh = 0
        if grad is not None:
            self.ref = weakref.ref(grad)
            self.version = version_of(grad)
            self.fresh = 1

    def hook(self, param: torch.Tensor) -> None:
        """Register the post-accumulate hook if the parameter can take one now."""
        if self.handle is None and param.requires_grad:
            self.handle = param.register_post_accumulate_grad_hook(  # type: ignore[no-untyped-call]
                self.on_accumulate
            )

    def hook_late(self, param: torch.Tensor) -> None:
        """Hook a parameter unfrozen since it was last looked at.

        A backward may already have written to it with no hook to see it: a
        gradient we do not hold counts as that backward's result.
        """
        if self.handle is not None:
            return  # hooked since: a later change in place is no backward
        grad = param.grad
        if grad is not None and not self.holds(grad):
            self._accumulated(param, grad)
        self.hook(param)

    def unhook(self) -> None:
        """Remove the hooks; idempotent."""
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        if self.inner is not None:
            self.inner.remove()
            self.inner = None

    def on_accumulate(self, param: torch.Tensor) -> None:
        """Post-accumulate hook: backward just wrote into ``param.grad``.

        A failure is handed to every guard's ``on_error`` (their containment),
        never left to break the user's backward; only a strict guard raises.
        """
        try:
            # Once per backward (its id), not per parameter: its number and mode,
            # where it was called, and any parameter unfrozen since.
            if _graph_task_id() != REGISTRY.looked:
                REGISTRY.new_backward()
            grad = param.grad
            # The usual case, inline (this runs per parameter at every backward):
            # the first gradient since a clear to None, in a single process.
            simple = not (self.fresh or self.shared or REGISTRY.distributed)
            if simple and self.ref is None and type(grad) is _TENSOR and not _compiling():
                self.ref, self.version, self.modes = _ref(grad), grad._version, REGISTRY.mode
                self.fresh, self.used, self.discarded = 1, True, 0
                self.since = self.last = REGISTRY.passes
            else:
                self._accumulated(param, grad)
        except Exception as exc:
            self.failed(exc)

    def failed(self, exc: BaseException) -> None:
        """Tell every guard using this slot that tracking it failed with ``exc``."""
        raised: BaseException | None = None
        for handler in list(self.on_error):
            try:
                handler(exc)
            except BaseException as err:  # strict mode: raise once all are told
                raised = raised or err
        if raised is not None:
            raise raised

    def _accumulated(self, param: torch.Tensor, grad: torch.Tensor | None) -> None:
        if grad is None:
            # Backward wrote it, and a hook registered before ours used it and
            # cleared it: the tutorial's optimizer step in backward. What is
            # gone applies nothing: while `ref` is None, `applied` and `stale`
            # are False (the hook's inline path relies on it).
            self.ref = None
            self.used = True
            self.applied = self.stale = False
            return
        # Only DDP, FSDP (or another hook sharing a buffer) changes a
        # gradient before the pass ends; a single process without views
        # skips that. (No DTensor gradient exists without a process group.)
        # Compiled autograd traces this hook: the other path breaks the graph
        # there, so what follows runs on the real gradient, not a fake one.
        if self.shared or REGISTRY.distributed or _compiling():
            self._accumulated_shared(param, grad)
            return
        version = grad._version
        ref = self.ref
        same = ref is not None and ref() is grad
        if same and version == self.version + 1:
            # Accumulated onto the gradient we saw last: a step that
            # applied it without a clear in between makes it stale.
            if self.applied:
                self.stale = True
            # `_in_window`, inline: this runs per parameter at every accumulating backward.
            if self.fresh:
                self.last, self.modes = REGISTRY.passes, self.modes | REGISTRY.mode
            else:
                self.since = self.last = REGISTRY.passes
                self.modes = REGISTRY.mode
            self.fresh += 1
        elif same and version == self.version:
            return  # recorded already, by `catch_up` at a step inside this backward
        elif same and in_shared_buffer(grad):
            # Other gradients in its buffer were written since: no clear.
            self.shared = True
            self._accumulated_shared(param, grad)
            return
        else:
            # `_restart`, inline: this runs per parameter at every backward.
            if self.fresh:
                self._end_fresh(param, grad)
            self._in_window(onto=False)
            self.ref = _ref(grad)
            self.stale = False
            self.fresh = 1
        self.used = True
        self.version = version
        self.applied = False
        self.discarded = 0

    def _restart(self, param: torch.Tensor, grad: torch.Tensor, count: int = 1) -> None:
        """A new object, or one changed in place since we saw it: its history ends here.

        ``count``: the backward passes in it (FSDP2's unsynced micro-batches).
        """
        if self.fresh:
            self._end_fresh(param, grad)
        self._in_window(onto=False)
        self.ref = weakref.ref(grad)
        self.stale = False
        self.fresh = count

    def _in_window(self, *, onto: bool) -> None:
        """The running backward pass wrote into the gradient: onto the window's passes
        (``onto``, when there are some), or beginning a window."""
        if onto and self.fresh:
            self.last, self.modes = REGISTRY.passes, self.modes | REGISTRY.mode
        else:
            self.since = self.last = REGISTRY.passes
            self.modes = REGISTRY.mode

    def _end_fresh(self, param: torch.Tensor, grad: torch.Tensor) -> None:
        """Backward output not applied yet is replaced by ``grad``."""
        if not self.stale and grad.grad_fn is None:
            self._discard(param)  # create_graph replaces .grad keeping its content

    def _accumulated_shared(self, param: torch.Tensor, grad: torch.Tensor) -> None:
        """`_accumulated` under torch.distributed or for a gradient in a shared buffer."""
        version = version_of(grad)
        ref = self.ref
        same = ref is not None and ref() is grad
        if same and version == self.version and self.applied:
            return  # recorded already, by `catch_up` at a step inside this backward
        view = in_shared_buffer(grad)  # the flag says it once was; this object may not be
        # FSDP2 writes a window's unsynced micro-batches into .grad at once.
        count, self.pending = self.pending or 1, 0
        backward = _current_backward()
        backward.slots.append(self)
        if same and version == self.version + 1:
            onto_last = True
            if view:
                backward.shared.setdefault(_buffer_key(grad, self.version), True)
        elif not view or (not same and is_dtensor(grad)):
            # FSDP2 makes a new DTensor only where .grad was None: never a
            # rebuilt view of what it held.
            onto_last = False
        elif not self.applied:
            # A view into a buffer others write to (a DDP bucket), inside a
            # window: the shared counter moved, or DDP rebuilt its buckets
            # and copied the gradient into a new view. Accumulation as usual.
            onto_last = True
        elif same:
            # Onto an applied gradient: stale only if the first write into
            # the buffer since then found it untouched.
            onto_last = backward.shared.setdefault(_buffer_key(grad, self.version), False)
        else:
            onto_last = False
        if onto_last:
            if self.applied:
                self.stale = True
            if not same:
                self.ref = weakref.ref(grad)
            self._in_window(onto=True)
            self.fresh += count
        else:
            self._restart(param, grad, count)
        self.used = True
        self.version = version
        self.applied = False
        self.discarded = 0

    def hook_sharded(self, source: torch.Tensor, *, flat: bool) -> None:
        """Hook what autograd writes to for this parameter under FSDP (see `_sharded`).

        ``source`` is FSDP2's unsharded parameter, or (``flat``) FSDP1's flat
        parameter holding this one.
        """
        if self.inner is None and source.requires_grad:
            if flat:
                # An FSDP1 slot: where the gradient it holds lives, if any.
                param = self.param_ref()
                grad = None if param is None else param.grad
                self.address = -1 if grad is None else grad.data_ptr()
            callback = self.on_flat if flat else self.on_unsharded
            self.inner = source.register_post_accumulate_grad_hook(  # type: ignore[no-untyped-call]
                callback
            )

    def on_unsharded(self, _unsharded: torch.Tensor) -> None:
        """FSDP2's unsharded parameter took a backward: one more micro-batch for ``.grad``."""
        self.pending += 1
        if _graph_task_id() != REGISTRY.looked:
            REGISTRY.new_backward()

    def on_flat(self, _flat: torch.Tensor) -> None:
        """FSDP1's flat parameter took a backward pass for this original parameter.

        ``.grad`` still holds what the last backward or step left: FSDP1 adds
        to it, or starts anew where it was cleared, and points ``.grad`` at
        the result when the pass ends, where `resync` reads it.
        """
        try:
            if _graph_task_id() != REGISTRY.looked:
                REGISTRY.new_backward()
            param = self.param_ref()
            if param is None or not param.requires_grad:
                return
            self.used = True
            if param.numel() == 0:
                return  # none of it is on this rank: it gets no gradient here
            _current_backward().slots.append(self)
            grad = param.grad
            if grad is not None and self._continued(grad):
                if self.applied:
                    self.stale = True
                self._in_window(onto=True)
                self.fresh += 1
            else:
                self._in_window(onto=False)
                if self.fresh:
                    if grad is None:
                        self._discard(param)  # set to None by hand inside a window
                    else:
                        self._end_fresh(param, grad)
                self.stale = False
                self.fresh = 1
            self.applied = False
            self.discarded = 0
        except Exception as exc:
            self.failed(exc)

    def _continued(self, grad: torch.Tensor) -> bool:
        """Whether FSDP1 is adding to the gradient last seen (the running backward wrote it).

        The gradient last seen, or FSDP1's new view of its memory, untouched
        since; inside a ``no_sync()`` window, maybe added to once already (the
        view is of the unsharded gradient, which autograd just accumulated into).
        """
        ref = self.ref
        if ref is None:
            return False
        if ref() is not grad and grad.data_ptr() != self.address:
            return False
        version = version_of(grad)
        return version == self.version or (version == self.version + 1 and not self.applied)

    def resync(self) -> None:
        """The backward that wrote this gradient ended: remember what it left in ``.grad``."""
        try:
            param = self.param_ref()
            grad = None if param is None else param.grad
            if grad is not None:
                self.see(grad)
                if self.address is not None:
                    self.address = grad.data_ptr()
        except Exception as exc:
            self.failed(exc)

    def _discard(self, param: torch.Tensor) -> None:
        # Not lost work: a clear inside a step (LBFGS, SAM with a closure), or
        # after the parameter itself was moved outside a step (SAM's
        # first_step perturbs the weights, then clears for a second backward).
        if not STEPS.inside() and param._version == self.param_version:
            self.lost += self.fresh

    def on_clear(self, param: torch.Tensor, inside_step: bool) -> None:
        """An observed ``zero_grad`` just cleared ``param.grad``."""
        if not inside_step and self.fresh:
            self.discarded = self.fresh
            if not self.stale:
                # A gradient built on an applied one (a GAN's cross-model
                # backward) is cleanup after a step, not lost work.
                self._discard(param)
        if inside_step:
            self.discarded = 0
        self.fresh = 0
        self.stale = False
        self.applied = False
        self.see(param.grad)

    def see(self, grad: torch.Tensor | None) -> None:
        """Remember ``grad`` as the object currently in ``.grad``."""
        if grad is None:
            self.ref = None
            self.version = -1
            return
        if self.ref is None or self.ref() is not grad:
            self.ref = weakref.ref(grad)
        self.version = version_of(grad)

    def found_zeros(self) -> None:
        """The device found the gradient a step applies, or applied, all zeros.

        Nothing was applied, so nothing accumulated onto it later is stale.
        """
        self.applied = self.stale = False

    def mark_used(self) -> None:
        """A gradient written by hand, with content, is applied: the parameter trains."""
        self.used = True

    def holds(self, grad: torch.Tensor) -> bool:
        """Whether ``grad`` is exactly the object and version last seen."""
        return self.ref is not None and self.ref() is grad and version_of(grad) == self.version


def catch_up(entries: list[tuple[torch.Tensor, Slot]]) -> None:
    """Record what the running backward wrote, for a step taken inside it.

    The optimizer step in backward (PyTorch's tutorial pattern) steps from a
    post-accumulate hook registered before ours, which has not run yet for
    this backward: without this, the step would see a gradient changed since
    the last one and take it for one written by hand. Our own hook, when it
    runs after the step, finds nothing new.
    """
    for param, slot in entries:
        grad = param.grad
        if grad is not None and not slot.holds(grad):
            slot.on_accumulate(param)


def inside_backward() -> bool:
    """Whether this thread is running a backward pass (a hook of it is running)."""
    return _graph_task_id() >= 0


def mark_cleared(
    entries: list[tuple[torch.Tensor, Slot]], slots: list[Slot], inside_step: bool
) -> bool:
    """An observed ``zero_grad`` just cleared these parameters' gradients.

    ``slots`` are the entries' slots, in order. `Slot.on_clear` for each; the
    usual case, a clear to ``None`` of gradients a step applied, is done
    inline, since this runs per parameter at every clear. Returns whether it
    cleared what a backward wrote since the last step (fresh gradients).
    """
    params = map(operator.itemgetter(0), entries)
    cleared = all(map(operator.is_, map(_GRAD, params), repeat(None)))
    fresh = any(map(_FRESH, slots))
    if cleared and not inside_step and not fresh:
        for slot in slots:
            slot.ref, slot.version, slot.stale, slot.applied = None, -1, False, False
        return False
    for param, slot in entries:
        if slot.fresh or inside_step:
            slot.on_clear(param, inside_step)
            continue
        slot.stale = slot.applied = False
        slot.see(param.grad)
    return fresh


def moved(params: list[torch.Tensor], slots: list[Slot]) -> list[torch.Tensor] | None:
    """The parameters whose gradient, the very object its slot last saw, was changed in
    place since (a clip rescales them all): ``[]`` when every one is untouched, in the
    version seen; ``None`` when any was replaced, or is not a plain tensor, or is sparse
    and changed (at C speed)."""
    refs = list(map(_REF, slots))
    if None in refs:
        return None
    grads = list(map(_GRAD, params))
    if not (
        all(map(operator.is_, grads, map(_DEREF, refs)))
        and all(map(operator.is_, map(type, grads), repeat(_TENSOR)))
    ):
        return None
    versions = list(map(_VERSION, grads))
    if versions == list(map(_SEEN_VERSION, slots)):
        return []
    if not all(map(operator.is_, map(_LAYOUT, grads), repeat(torch.strided))):
        return None
    return list(compress(params, map(operator.ne, versions, map(_SEEN_VERSION, slots))))


Split = tuple[list[torch.Tensor], list[Slot], list[torch.Tensor], list[Slot]]
"""A step's trainable parameters and their slots, then the frozen ones and theirs."""


def usual_step(
    params: list[torch.Tensor], slots: list[Slot]
) -> tuple[Split, int, list[torch.Tensor]] | None:
    """A usual step's parameters, the backward passes of its window, and those changed in
    place since backward (at C speed).

    Usual: every trainable parameter holds the gradient backward left, on
    nothing a step applied, with no backward result lost, and every frozen
    one holds no gradient (what freezing asks for: they take no part). The
    gradients are untouched since, or (a clipped step) the same objects
    changed in place: those are the third part. ``None`` for any other step.
    """
    trainable = list(map(_REQUIRES_GRAD, params))
    if all(trainable):
        parts: Split = (params, slots, [], [])
    else:
        frozen = list(map(operator.not_, trainable))
        frozen_params = list(compress(params, frozen))
        if not all(map(operator.is_, map(_GRAD, frozen_params), repeat(None))):
            return None
        trained, trained_slots = list(compress(params, trainable)), list(compress(slots, trainable))
        parts = (trained, trained_slots, frozen_params, list(compress(slots, frozen)))
    trained, trained_slots = parts[0], parts[1]
    fresh = list(map(_FRESH, trained_slots))
    if not fresh or 0 in fresh or any(map(_STALE, trained_slots)) or any(map(_LOST, trained_slots)):
        return None
    changed = moved(trained, trained_slots)
    return None if changed is None else (parts, max(fresh), changed)


def _inert(frozen: list[torch.Tensor], slots: list[Slot]) -> bool:
    """Whether frozen slots are as a step leaves a parameter without a gradient."""
    return (
        all(map(operator.is_, map(_REF, slots), repeat(None)))  # so not applied, not stale
        and not any(map(_FRESH, slots))
        and not any(map(_DISCARDED, slots))
        and not any(map(_LOST, slots))
        and list(map(_VERSION, frozen)) == list(map(_PARAM_VERSION, slots))
    )


def mark_applied(
    entries: list[tuple[torch.Tensor, Slot]],
    params: list[torch.Tensor],
    slots: list[Slot],
    usual: Split | None = None,
) -> None:
    """A step just consumed these parameters' gradients.

    ``params`` and ``slots`` are the entries' two halves, in order; ``usual``:
    the parts of a step judged usual (`usual_step`), recorded inline if
    nothing changed since.
    """
    changed = None
    if (
        usual is not None
        and 0 not in map(_FRESH, usual[1])
        and (not usual[2] or _inert(usual[2], usual[3]))
    ):
        changed = moved(usual[0], usual[1])
    if usual is not None and changed is not None:
        # Fresh slots have nothing discarded, and within a step judged usual
        # none turns stale or loses a result: only these change.
        if not changed:
            for slot, version in zip(usual[1], map(_VERSION, usual[0]), strict=True):
                slot.fresh, slot.applied, slot.param_version = 0, True, version
            return
        # Clipped: what was changed in place since is content, unless the
        # device finds zeros (the zero check un-applies those).
        for param, slot in zip(usual[0], usual[1], strict=True):
            version = param.grad._version  # type: ignore[union-attr]
            if version != slot.version:
                slot.used = True
                slot.version = version
            slot.fresh, slot.applied, slot.param_version = 0, True, param._version
        return
    for param, slot in entries:
        grad = param.grad
        if grad is None:
            slot.applied = False
            slot.ref = None
        else:
            ref = slot.ref
            same = ref is not None and ref() is grad
            # version_of, inline: this runs per parameter at every step.
            version = grad._version if type(grad) is _TENSOR else version_of(grad)
            if same and (version == slot.version or grad.is_sparse):
                # Backward output (fresh, or re-applied) is content; zeros a
                # clear left are not.
                slot.applied = slot.fresh > 0 or slot.applied
            else:
                # Written since we saw it: clipped after backward, or by hand
                # (assigned, copied into). Content, unless the device finds
                # zeros: the guard's zero check un-applies those.
                slot.applied = slot.used = True
                if not same:
                    slot.ref = weakref.ref(grad)
            slot.version = version
        slot.fresh = 0
        slot.stale = False
        slot.discarded = 0
        slot.lost = 0
        slot.param_version = param._version


def _buffer_key(grad: torch.Tensor, version: int) -> tuple[int, int]:
    """The buffer a shared gradient lives in (its storage's address) and a version of it."""
    return (local(grad).untyped_storage().data_ptr(), version)


def in_shared_buffer(grad: torch.Tensor) -> bool:
    """Whether ``grad`` is part of a larger buffer whose version counter others move too.

    DDP's bucket views are, and so are the slices AccumulateGrad keeps from
    the backward of a ``torch.cat`` or ``torch.stack`` of parameters (not
    views, but sharing the buffer and its counter). A view of a buffer of its
    own size (a transposed matrix from ``torch.autograd.grad``) is not. A
    DTensor is judged by its local shard: FSDP2's shards of one parameter
    group are views into one reduce-scatter output.
    """
    grad = local(grad)
    if type(grad) is not _TENSOR or grad.layout is not torch.strided:
        return False  # sparse, or a subclass with storage of its own kind
    return bool(grad.untyped_storage().nbytes() > grad.numel() * grad.element_size())


def learn_shared(entries: list[tuple[torch.Tensor, Slot]]) -> None:
    """Mark the slots whose gradients live in a shared buffer (once, at a step).

    Their post-accumulate hook then takes the path that tells a write into the
    buffer by another gradient from a clear.
    """
    for param, slot in entries:
        grad = param.grad
        if grad is not None and not slot.shared and in_shared_buffer(grad):
            slot.shared = True


TRAIN = 1
"""`Registry.mode` of a backward pass run while every watched model was in train mode."""
EVAL = 2
"""... while some watched model was in eval mode (``model.eval()``: validation)."""
_TRAINING = operator.attrgetter("training")
_ALIVE = functools.partial(operator.is_not, None)
_LINES_KEPT = 64  # the latest backward passes whose line `Registry.line_of` knows


class Registry:
    """The process's slots, one per watched parameter, with reference counts; and the
    backward passes: their number, the watched models' mode in each, where each ran."""

    def __init__(self) -> None:
        self._slots: dict[int, Slot] = {}
        self._lock = threading.Lock()
        # Slots of parameters that were frozen when last looked at: they have
        # no hook. Each backward looks once whether any was unfrozen since, so
        # a backward into one is seen from the first, not only from the next
        # step or clear; it takes a backward that also writes to a parameter
        # already hooked.
        self.frozen: dict[int, Slot] = {}
        self.looked = -1  # the backward (graph task) that last looked
        # Where the user's code called the last backward (``loss.backward()``).
        self.backward_at: Location | None = None
        # The backward passes so far, numbered from 1, and the mode of the running one
        # (TRAIN or EVAL; 0 with no model watched): slots note both (`Slot.since`).
        self.passes = 0
        self.mode = 0
        self.models: list[weakref.ref[torch.nn.Module]] = []  # every guard's models
        self._lines: dict[int, Location | None] = {}  # pass -> its user line, the latest ones
        # (pass, mode, line) where the mode changed: the first pass of each run of one mode.
        self._turns: list[tuple[int, int, Location | None]] = []
        # Whether a process group is up, as of the last step, clear or guard
        # created: read per parameter in the hook, so not asked of torch there.
        self.distributed = _distributed()

    def acquire(self, param: torch.Tensor, on_error: ErrorHandler) -> Slot:
        """Return the parameter's slot, creating and hooking it on first use.

        ``on_error`` is called if tracking the parameter fails in backward.
        """
        self.distributed = _distributed()
        with self._lock:
            key = id(param)
            slot = self._slots.get(key)
            if slot is None or slot.param_ref() is not param:
                slot = Slot(param)
                self._slots[key] = slot
                slot.finalizer = weakref.finalize(param, self._forget, key, weakref.ref(slot))
            slot.users += 1
            slot.on_error.append(on_error)
        slot.hook(param)
        if slot.handle is None:
            with self._lock:
                self.frozen[key] = slot
        return slot

    def new_backward(self) -> None:
        """A backward pass began writing gradients: number it, note the watched models'
        mode and where the user called it, and hook the watched parameters unfrozen since
        last looked at (once per pass)."""
        self.looked = _graph_task_id()
        self.passes += 1
        # Its hooks run in the calling thread on the CPU; on a CUDA device thread
        # no user frame is on the stack, and nothing is noted.
        user = user_location(2)
        self.backward_at = where = user if user.filename and not user.library else None
        self._lines[self.passes] = where
        self._lines.pop(self.passes - _LINES_KEPT, None)
        models = list(filter(_ALIVE, map(_DEREF, self.models)))
        mode = 0 if not models else TRAIN if all(map(_TRAINING, models)) else EVAL
        if mode != self.mode:
            self.mode = mode
            self._turns = [*self._turns[-_LINES_KEPT:], (self.passes, mode, where)]
        if self.frozen:
            self.hook_unfrozen()

    def line_of(self, backward: int) -> Location | None:
        """Where the user called backward pass number ``backward``, if among the latest."""
        return self._lines.get(backward)

    def turned(self, mode: int, until: int) -> Location | None:
        """Where the latest run of backward passes in ``mode`` up to pass ``until`` began."""
        for start, turned_to, where in reversed(self._turns):
            if start <= until and turned_to == mode:
                return where
        return None

    def watch_models(self, models: list[torch.nn.Module]) -> list[weakref.ref[torch.nn.Module]]:
        """Note these models' mode in every backward pass from now on; returns the
        references to hand back to `unwatch_models`."""
        refs = [weakref.ref(m) for m in models]
        self.models = [r for r in self.models if r() is not None] + refs
        return refs

    def unwatch_models(self, refs: list[weakref.ref[torch.nn.Module]]) -> None:
        """Stop noting the models `watch_models` returned these references for."""
        drop = set(map(id, refs))
        self.models = [r for r in self.models if id(r) not in drop and r() is not None]

    def hook_unfrozen(self) -> None:
        """Hook the watched parameters unfrozen since they were last looked at."""
        with self._lock:
            waiting = list(self.frozen.items())
        slots = list(map(operator.itemgetter(1), waiting))
        params = list(map(_DEREF, map(_PARAM_REF, slots)))
        if (
            all(map(operator.is_not, params, repeat(None)))
            and not any(map(getattr, params, repeat("requires_grad"), repeat(False)))
            and all(map(operator.is_, map(_HANDLE, slots), repeat(None)))
        ):
            return  # none unfrozen, hooked elsewhere or collected since (at C speed)
        for key, slot in waiting:
            param = slot.param_ref()
            if param is not None and not param.requires_grad and slot.handle is None:
                continue
            with self._lock:
                self.frozen.pop(key, None)
            if param is not None:
                try:
                    slot.hook_late(param)
                except Exception as exc:
                    slot.failed(exc)

    def release(self, slot: Slot, on_error: ErrorHandler) -> None:
        """Drop the user of ``slot`` that passed ``on_error``; the last one removes its hook."""
        with self._lock:
            if on_error in slot.on_error:
                slot.on_error.remove(on_error)
            slot.users -= 1
            if slot.users > 0:
                return
            slot.unhook()
            if self.frozen.get(slot.key) is slot:
                del self.frozen[slot.key]
            if slot.finalizer is not None:
                slot.finalizer.detach()
            param = slot.param_ref()
            if param is not None and self._slots.get(id(param)) is slot:
                del self._slots[id(param)]

    def _forget(self, key: int, slot_ref: weakref.ref[Slot]) -> None:
        with self._lock:
            slot = slot_ref()
            if self._slots.get(key) is slot:
                del self._slots[key]
            if self.frozen.get(key) is slot:
                del self.frozen[key]

    def watched(self) -> list[int]:
        """Ids of the parameters some live guard watches."""
        with self._lock:
            return list(self._slots)

    def clear(self) -> None:
        """Unhook and forget every slot (a reset for tests, once the guards are closed)."""
        with self._lock:
            slots = {id(s): s for s in [*self._slots.values(), *self.frozen.values()]}
            self._slots.clear()
            self.frozen.clear()
        for slot in slots.values():
            slot.unhook()
            if slot.finalizer is not None:
                slot.finalizer.detach()
        self.looked = -1
        self.passes = self.mode = 0
        self.backward_at = None
        self.models, self._lines, self._turns = [], {}, []

    def __len__(self) -> int:
        return len(self._slots)


REGISTRY = keep("slots", Registry())
