"""The public entry points: `guard`, `guarding`, `unguard`, `guard_of`, and `attach`.

They check their arguments where they are passed, then create, find or close
the optimizer's `Guard` (``gradguard._guard``), which owns the hooks. A guard
takes every option its call left out from the active session
(`gradguard._config.session_defaults`): ``gradguard run``, `gradguard.install`,
the pytest plugin.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import torch
from torch import nn

from gradguard._config import Options, describe, make_options, passed, session_defaults, unset
from gradguard._dispatch import _log, has_record_sinks
from gradguard._guard import _GUARDS, _LOCK, _PROPAGATE, Guard
from gradguard._integrations import accumulation_steps as framework_accumulation
from gradguard._integrations import unwrap
from gradguard._stderr import say

OptimizerT = TypeVar("OptimizerT", bound=torch.optim.Optimizer)


def _models(model: object) -> list[nn.Module]:
    if model is None:
        return []
    if isinstance(model, nn.Module):
        return [model]
    allowed = "model must be an nn.Module, a list of them, or None"
    if isinstance(model, (str, bytes, torch.Tensor)) or not isinstance(model, Iterable):
        raise TypeError(f"{allowed}; got {describe(model)}")
    models = list(model)
    for m in models:
        if not isinstance(m, nn.Module):
            raise TypeError(f"{allowed}; got an item of type {describe(m)}")
    return models


def _check_optimizer(optimizer: object, caller: str = "guard") -> torch.optim.Optimizer:
    """The torch optimizer ``optimizer`` is or wraps; a TypeError naming it if none.

    ``caller`` names the function in the message. Only `guard` and `guarding`
    need an optimizer whose step can be hooked.
    """
    attaching = caller in ("guard", "guarding")
    if isinstance(optimizer, nn.Module):
        how = (
            f"use {caller}(torch.optim.SGD(model.parameters(), ...), model=model)"
            if attaching
            else "pass the optimizer that was guarded"
        )
        raise TypeError(
            f"{caller}() takes the optimizer, not the model ({type(optimizer).__name__}); {how}"
        )
    optimizer = unwrap(optimizer)  # Accelerate's and Lightning's wrappers: guard what they wrap
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"{caller}() needs a torch.optim.Optimizer; got {describe(optimizer)}")
    if attaching and not hasattr(optimizer, "_optimizer_step_pre_hooks"):
        raise TypeError(
            f"{type(optimizer).__name__} never called torch.optim.Optimizer.__init__, so its step "
            "cannot be hooked; guard the optimizer it wraps instead"
        )
    return optimizer


def _checked(
    optimizer: object,
    *,
    model: object = None,
    caller: str = "guard",
    **options: object,
) -> tuple[torch.optim.Optimizer, list[nn.Module], Options, dict[str, object]]:
    """Every argument of `guard` checked, before anything is attached; raises naming the bad one.

    Returns the optimizer, the models, the options and those of them the
    call gave. An option left out (``None`` for ``mode``, ``ignore`` and
    ``record_norms``) comes from the active session (the runner, `install`,
    the pytest plugin), else its default.
    """
    opt = _check_optimizer(optimizer, caller)
    given = passed(options)
    make_options(**given)  # the call's own values first: an error names what it passed
    checked = make_options(**{**session_defaults(), **given})
    return opt, _models(model), checked, given


def attach(
    optimizer: object,
    *,
    model: nn.Module | Iterable[nn.Module] | None = None,
    judge_first_step: bool = True,
    **options: Any,
) -> Guard:
    """Validate the arguments and return the optimizer's guard, creating it if needed.

    See `_checked` for the options left out. The accumulation window a
    framework drives the optimizer with (Accelerate, Lightning, the
    transformers Trainer) is the code's: it wins over a session's, not over
    the call's.
    """
    opt, models, checked, given = _checked(optimizer, model=model, **options)
    if given.get("accumulation_steps") is None:
        steps = framework_accumulation(opt, optimizer)
        if steps is not None:
            checked = dataclasses.replace(checked, accumulation_steps=steps)
    with _LOCK:
        existing = _GUARDS.get(opt)
        if existing is not None and not existing.closed:
            return existing
        g = Guard(opt, models=models, options=checked, judge_first_step=judge_first_step)
        _GUARDS[opt] = g
    if checked.record_norms and not has_record_sinks():
        _log().warning(
            "record-norms-without-log",
            optimizer=g.optimizer,
            note="record_norms=True writes to a JSON log, and none is open; start one with "
            "gradguard.install(log_json=PATH) or gradguard run --log-json PATH",
        )
    return g


def guard(
    optimizer: OptimizerT,
    *,
    model: nn.Module | Iterable[nn.Module] | None = None,
    mode: str | None = None,
    ignore: Iterable[str] | None = None,
    accumulation_steps: int | None = unset("accumulation_steps"),
    check_numerics: bool = unset("check_numerics"),
    numerics_every: int | None = unset("numerics_every"),
    explode_factor: float = unset("explode_factor"),
    max_grad_norm: float | None = unset("max_grad_norm"),
    unused_after: int = unset("unused_after"),
    record_norms: bool | None = None,
    check_ranks_every: int | None = unset("check_ranks_every"),
) -> OptimizerT:
    """Watch ``optimizer`` for gradient-handling bugs and return it unchanged.

    Every option left out takes the value the active session gives it
    (``gradguard run``, `gradguard.install`, the pytest plugin, each with
    what ``[tool.gradguard]``, the environment and the command line say),
    else the default shown; an option passed here always wins.

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
        numerics_every: run them every this many steps. By default every
            step, except on a CPU with more than 256 gradient tensors, where
            the norm pass loops over tensors: every ceil(n / 256)-th step.
        explode_factor: GG202 fires when the total gradient norm reaches this
            multiple of the largest norm of any earlier step, or rises at each
            of 6 steps in a row by this factor in all.
        max_grad_norm: GG202 also fires above this absolute total norm.
        unused_after: steps after which a parameter that never received a
            gradient is reported (GG301).
        record_norms: write every step's total gradient norm and its norm
            per top-level module (the 8 largest, the rest as ``"(other)"``)
            to the open JSON logs (`gradguard.install` with ``log_json=``,
            ``gradguard run --log-json``), for ``gradguard report --plot``.
            Computed in the same batched pass as the numeric checks, which
            then run every step. Omitted, the active session's setting.
        check_ranks_every: under ``torch.distributed``, every this many steps
            compare a fingerprint of the gradients about to be applied across
            ranks, with one small collective, and report ranks that disagree
            (GG401). Off by default; for data-parallel replicas (DDP), not
            sharded training (FSDP), where it is skipped with a log line.

    Raises:
        TypeError: ``optimizer`` is not an optimizer (a model, ``None``, ...),
            or an option has the wrong type.
        ValueError: unknown ``mode`` or finding code, or an out-of-range option.
    """
    attach(**locals())  # every argument, as given
    return optimizer


def guarding(
    optimizer: torch.optim.Optimizer,
    *,
    model: nn.Module | Iterable[nn.Module] | None = None,
    mode: str | None = None,
    ignore: Iterable[str] | None = None,
    accumulation_steps: int | None = unset("accumulation_steps"),
    check_numerics: bool = unset("check_numerics"),
    numerics_every: int | None = unset("numerics_every"),
    explode_factor: float = unset("explode_factor"),
    max_grad_norm: float | None = unset("max_grad_norm"),
    unused_after: int = unset("unused_after"),
    record_norms: bool | None = None,
    check_ranks_every: int | None = unset("check_ranks_every"),
) -> contextlib.AbstractContextManager[Guard]:
    """Guard ``optimizer`` inside a ``with`` block; every hook is removed on exit, even on error.

    Takes the same arguments as `guard`, and checks them at the call, as it
    does. Yields the `Guard`, whose ``findings`` and ``summary()`` stay
    readable after the block. An optimizer that was already guarded keeps
    its guard.
    """
    arguments = locals()  # every argument, as given
    _checked(**arguments, caller="guarding")  # at the call, not at the ``with``
    return _guarding(arguments)


@contextlib.contextmanager
def _guarding(arguments: dict[str, Any]) -> Iterator[Guard]:
    opt = _check_optimizer(arguments["optimizer"], "guarding")
    owned = _GUARDS.get(opt) is None
    g = attach(**arguments)
    try:
        yield g
    finally:
        if owned:
            g.close()


def settle_all() -> None:
    """`Guard.settle` every live guard: what they found reaches today's sinks.

    The first strict finding is raised once every guard has settled.
    """
    error: BaseException | None = None
    for g in list(_GUARDS.values()):
        try:
            g.settle()
        except _PROPAGATE as exc:
            error = error or exc
    if error is not None:
        raise error


def _settle_at_exit() -> None:
    """At interpreter exit: a result still on the device is about a step that ran."""
    try:
        settle_all()
    except Exception as exc:  # the interpreter is going away; say what, never raise
        say(f"gradguard: {type(exc).__name__}: {exc}")


atexit.register(_settle_at_exit)


def unguard(optimizer: torch.optim.Optimizer) -> Guard | None:
    """Report anything pending, remove every hook from ``optimizer`` and return its guard.

    Raises:
        TypeError: ``optimizer`` is not an optimizer (or a framework's wrapper of one).
    """
    g = _GUARDS.get(_check_optimizer(optimizer, "unguard"))
    if g is not None:
        g.close()
    return g


def guard_of(optimizer: torch.optim.Optimizer) -> Guard | None:
    """The live guard watching ``optimizer``, if any.

    Raises:
        TypeError: ``optimizer`` is not an optimizer (or a framework's wrapper of one).
    """
    g = _GUARDS.get(_check_optimizer(optimizer, "guard_of"))
    return None if g is None or g.closed else g
