"""What gradguard knows about training frameworks that wrap the user's optimizer.

Nothing here imports a framework: each one is looked at only if the process
already imported it.
"""

from __future__ import annotations

import gc
import sys
from types import FrameType
from typing import Any

import torch

# Wrappers that hold the real optimizer in ``.optimizer`` and whose own step or
# zero_grad gradguard cannot hook: Accelerate's AcceleratedOptimizer never calls
# Optimizer.__init__; Lightning's LightningOptimizer copies the optimizer's
# __dict__ into a look-alike of its class.
_WRAPPERS = frozenset({"AcceleratedOptimizer", "LightningOptimizer"})


def unwrap(optimizer: object) -> object:
    """The torch optimizer behind a framework's wrapper, or ``optimizer`` itself.

    Guarding the wrapped optimizer means its zero_grad, called by the wrapper,
    is the one gradguard observes, and its steps are the real updates (an
    AcceleratedOptimizer's step inside an accumulation window is a no-op).
    """
    for _ in range(4):  # wrappers of wrappers (Lightning over Accelerate)
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is optimizer:
            return optimizer
        hookable = isinstance(optimizer, torch.optim.Optimizer) and hasattr(
            optimizer, "_optimizer_step_pre_hooks"
        )
        wrapper = any(c.__name__ in _WRAPPERS for c in type(optimizer).__mro__)
        if hookable and not wrapper:
            return optimizer
        optimizer = inner
    return optimizer


def accumulation_steps(optimizer: torch.optim.Optimizer, given: object = None) -> int | None:
    """The accumulation window a framework drives ``optimizer`` with, if it says.

    ``given`` is what the user passed to ``guard()``, which may be the
    framework's wrapper itself.

    Accelerate: ``Accelerator(gradient_accumulation_steps=N)`` records N in its
    process-wide ``GradientState``, and ``accelerator.accumulate(model)`` turns
    the wrapping AcceleratedOptimizer's step and zero_grad into no-ops for the
    first N-1 micro-batches of each window. The transformers Trainer tells
    Accelerate 1 and accumulates itself: its ``args.gradient_accumulation_steps``.
    PyTorch Lightning: the Trainer's ``accumulate_grad_batches``, reached from
    the LightningOptimizer wrapping ``optimizer``. Only a window of 2 or more
    counts.

    The wrappers are looked for in ``given`` and in the frames of the call
    stack that a framework's wrapper runs in: a guard attached at the first
    step runs under the wrapper's ``step``, one attached from a transformers
    callback under ``CallbackHandler.call_event``. Walking every live object,
    which takes a noticeable time in a large program, is left for where a
    wrapper is known to exist but not what holds it.
    """
    frames = _wrapper_frames()
    selves = [given, *(f.get("self") for f in frames)]
    steps = (
        _accelerate_steps(optimizer, selves)
        or _transformers_steps(optimizer, selves, frames)
        or _lightning_steps(optimizer, selves)
    )
    return steps if isinstance(steps, int) and steps > 1 else None


# Methods a framework's optimizer wrapper or callback dispatcher runs in. Only
# these frames' locals are read: in Python < 3.13 reading them keeps a copy of
# every local until the frame returns, harmless for a call that ends with the
# step or the callback, not for a training loop that runs for hours.
_WRAPPER_METHODS = frozenset({"step", "call_event"})


def _wrapper_frames(limit: int = 64) -> list[dict[str, Any]]:
    """The locals of the wrapper methods running on the call stack, innermost first."""
    out: list[dict[str, Any]] = []
    frame: FrameType | None = sys._getframe(1)
    for _ in range(limit):
        if frame is None:
            break
        code = frame.f_code
        if code.co_name in _WRAPPER_METHODS and code.co_varnames[:1] == ("self",):
            out.append(frame.f_locals)
        frame = frame.f_back
    return out


def callback_handler(callback: object) -> Any:
    """The transformers ``CallbackHandler`` calling ``callback`` now, if one is on the stack.

    The Trainer hands its callbacks neither itself nor its handler; the
    handler's ``call_event`` is the frame that runs each of them.
    """
    for f in _wrapper_frames():
        handler = f.get("self")
        if _named(handler, "CallbackHandler") and any(
            c is callback for c in getattr(handler, "callbacks", ())
        ):
            return handler
    return None


def _named(obj: object, name: str) -> bool:
    return any(c.__name__ == name for c in type(obj).__mro__)


def _holder(optimizer: object, selves: list[object], wrapper: str, attr: str) -> Any:
    """The object among ``selves`` of a class named ``wrapper`` whose ``attr`` is ``optimizer``."""
    return next((obj for obj in selves if _wraps(obj, optimizer, wrapper, attr)), None)


def _wraps(obj: object, optimizer: object, wrapper: str, attr: str) -> bool:
    """Whether ``obj`` is of a class named ``wrapper`` and holds ``optimizer`` as ``attr``."""
    return _named(obj, wrapper) and getattr(obj, "__dict__", {}).get(attr) is optimizer


def _accelerate_steps(optimizer: torch.optim.Optimizer, selves: list[object]) -> object:
    state = sys.modules.get("accelerate.state")
    shared = getattr(getattr(state, "GradientState", None), "_shared_state", None)
    if not shared:
        return None
    steps = shared.get("plugin_kwargs", {}).get("num_steps", 1)
    if not isinstance(steps, int) or steps <= 1:
        return None
    found = _holder(optimizer, selves, "AcceleratedOptimizer", "optimizer") or _wrapper_of(
        optimizer, "AcceleratedOptimizer", "optimizer"
    )
    return steps if found is not None else None


def _transformers_steps(
    optimizer: torch.optim.Optimizer, selves: list[object], frames: list[dict[str, Any]]
) -> object:
    if "transformers.trainer" not in sys.modules:
        return None
    for f in frames:  # a callback: the dispatcher holds the optimizer and the arguments
        handler = f.get("self")
        held = getattr(handler, "optimizer", None)
        if _named(handler, "CallbackHandler") and unwrap(held) is optimizer:
            return getattr(f.get("args"), "gradient_accumulation_steps", None)
    # The first step, under the Trainer's AcceleratedOptimizer: the Trainer holds it.
    wrapper = _holder(optimizer, selves, "AcceleratedOptimizer", "optimizer")
    trainer = None if wrapper is None else _wrapper_of(wrapper, "Trainer", "optimizer")
    return getattr(getattr(trainer, "args", None), "gradient_accumulation_steps", None)


def _lightning_steps(optimizer: torch.optim.Optimizer, selves: list[object]) -> object:
    if "pytorch_lightning" not in sys.modules and "lightning" not in sys.modules:
        return None
    wrapper = _holder(optimizer, selves, "LightningOptimizer", "_optimizer")
    try:
        trainer = wrapper._strategy.lightning_module.trainer
        return trainer.accumulate_grad_batches
    except Exception:  # not attached to a Trainer: nothing declared
        return None


def _wrapper_of(optimizer: torch.optim.Optimizer, wrapper: str, attr: str) -> Any:
    """A live instance of a class named ``wrapper`` whose ``attr`` is ``optimizer``.

    Walks the objects referring to ``optimizer`` (the wrapper itself, or its
    ``__dict__`` and then the wrapper): once per guard, never per step, and
    only where a framework's wrapper is known to exist.
    """
    for holder in gc.get_referrers(optimizer):
        if _named(holder, wrapper):
            if _wraps(holder, optimizer, wrapper, attr):
                return holder
        elif isinstance(holder, dict) and holder.get(attr) is optimizer:
            for owner in gc.get_referrers(holder):
                if _named(owner, wrapper) and getattr(owner, "__dict__", None) is holder:
                    return owner
    return None
