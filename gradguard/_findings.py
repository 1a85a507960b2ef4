"""The catalogue of finding codes and the `Finding` record every check returns.

Codes and names are a public contract: users filter on them in logs, in
``ignore=`` and in ``-W`` warning filters. Add codes; never renumber them.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

Level = Literal["info", "warning", "error"]


@dataclasses.dataclass(frozen=True)
class Code:
    """One entry of the catalogue: what a finding code means and how to fix it."""

    code: str
    name: str
    level: Level
    summary: str
    hint: str

    @property
    def doc(self) -> str:
        """The page explaining this code, relative to the repository root."""
        return f"{DOCS_DIR}/{self.code}.md"


DOCS_DIR = "docs/findings"
"""Where each code's page lives: the bug, the fix, and how to silence it."""

CATALOGUE: dict[str, Code] = {
    c.code: c
    for c in (
        Code(
            code="GG101",
            name="stale-gradient",
            level="error",
            summary="step() applied gradients that an earlier step already applied",
            hint=(
                "call optimizer.zero_grad() once per step, before loss.backward() "
                "or right after optimizer.step(), on the optimizer that owns these parameters"
            ),
        ),
        Code(
            code="GG102",
            name="cleared-before-step",
            level="error",
            summary=(
                "gradients produced by backward() were cleared before step() used them, "
                "so the step applied nothing for these parameters"
            ),
            hint=(
                "move zero_grad() before loss.backward() (or after optimizer.step()); "
                "never clear between backward() and step()"
            ),
        ),
        Code(
            code="GG103",
            name="step-without-backward",
            level="error",
            summary="step() ran but no parameter received a gradient since the previous step",
            hint=(
                "call loss.backward() before optimizer.step(), and keep step() out of "
                "validation loops and torch.no_grad() blocks"
            ),
        ),
        Code(
            code="GG104",
            name="accumulation-mismatch",
            level="warning",
            summary="the declared gradient accumulation window was not respected",
            hint=(
                "step once every accumulation_steps micro-batches and clear only right "
                "after the step, through the optimizer"
            ),
        ),
        Code(
            code="GG105",
            name="discarded-gradients",
            level="warning",
            summary=(
                "backward results were cleared before any step applied them, step after step, "
                "so only the last micro-batch before each step counts"
            ),
            hint=(
                "clear once per optimizer step (right after step()), not before every "
                "micro-batch's backward()"
            ),
        ),
        Code(
            code="GG106",
            name="foreign-gradient",
            level="warning",
            summary=(
                "a step applied, along with its own, gradients a backward wrote for another update"
            ),
            hint=(
                "clear each optimizer's gradients right before its own backward() (or freeze "
                "the other model with requires_grad_(False) during the other update), and "
                "run validation under torch.no_grad()"
            ),
        ),
        Code(
            code="GG201",
            name="non-finite-gradient",
            level="error",
            summary="a step is applying NaN or Inf gradients",
            hint=(
                "find the op producing NaN/Inf (torch.autograd.detect_anomaly() for one step), "
                "lower the learning rate or use a GradScaler, which skips such steps"
            ),
        ),
        Code(
            code="GG202",
            name="exploding-gradient",
            level="warning",
            summary=(
                "the gradient norm exploded: it jumped far past any earlier step's, "
                "or kept rising step after step"
            ),
            hint=(
                "clip with torch.nn.utils.clip_grad_norm_ before step(), lower the learning "
                "rate or add warm-up"
            ),
        ),
        Code(
            code="GG301",
            name="unused-parameter",
            level="warning",
            summary="trainable parameters in the optimizer never received a gradient",
            hint=(
                "make sure they take part in the loss (no detach(), no torch.no_grad() around "
                "them), or freeze them with requires_grad_(False)"
            ),
        ),
        Code(
            code="GG302",
            name="unoptimized-parameter",
            level="warning",
            summary="parameters of the model receive gradients but no optimizer updates them",
            hint=(
                "build the optimizer after the model is complete, or add them with "
                "optimizer.add_param_group({'params': [...]})"
            ),
        ),
        Code(
            code="GG303",
            name="eval-mode-step",
            level="warning",
            summary="a step is training a model that is in eval mode",
            hint="call model.train() after validation, before training resumes",
        ),
        Code(
            code="GG401",
            name="rank-divergence",
            level="error",
            summary=(
                "data-parallel ranks are about to apply different gradients, so their "
                "replicas of the model drift apart"
            ),
            hint=(
                "run every micro-batch but the last of a window under model.no_sync(), "
                "forward and backward, and step all ranks at the same micro-batch"
            ),
        ),
    )
}


@dataclasses.dataclass(frozen=True)
class Finding:
    """One detected gradient-handling problem, with everything needed to fix it.

    Attributes:
        code: stable code such as ``"GG102"``.
        name: stable kebab-case name such as ``"cleared-before-step"``.
        level: ``"info"``, ``"warning"`` or ``"error"``.
        message: the full one-line report, code first, then the fix and the
            page that explains the code.
        hint: the one-line fix.
        step: the optimizer's step index (1 for its first ``step()`` call).
        optimizer: a label for the optimizer, such as ``"SGD#0"``.
        params: qualified parameter names, e.g. ``("encoder.0.weight",)``.
        location: ``file:line`` of the user's code that ran the step.
        written_at: ``file:line`` of the user's ``backward()`` that wrote the
            gradients the finding is about, where known (GG101, GG102), or
            the foreign backward's (GG106).
        cleared_at: ``file:line`` of the user's ``zero_grad()`` that cleared
            them, or ``"outside any optimizer"`` when no optimizer's
            ``zero_grad()`` did (GG102).
    """

    code: str
    name: str
    level: Level
    message: str
    hint: str
    step: int
    optimizer: str
    params: tuple[str, ...]
    location: str
    written_at: str = ""
    cleared_at: str = ""

    @property
    def doc(self) -> str:
        """The page explaining this finding's code, such as ``docs/findings/GG102.md``."""
        entry = CATALOGUE.get(self.code)
        return entry.doc if entry is not None else ""


def make_finding(
    code: str,
    *,
    step: int,
    optimizer: str,
    params: tuple[str, ...],
    location: str,
    detail: str = "",
    written_at: str = "",
    cleared_at: str = "",
) -> Finding:
    """Build a `Finding` for ``code`` with the catalogue's name, level, message and fix.

    ``detail`` adds the numbers behind a finding (a norm, a count) to its summary;
    ``written_at`` and ``cleared_at`` tell its story, line by line (`story`).
    """
    entry = CATALOGUE[code]
    where = f" ({location})" if location else ""
    extra = "; ".join(x for x in (detail, story(code, written_at, cleared_at, location)) if x)
    what = f"{entry.summary} ({extra})" if extra else entry.summary
    message = (
        f"{entry.code} {entry.name}: {what}, at step {step} of {optimizer}{where}, "
        f"params [{', '.join(_shorten(params))}]. Fix: {entry.hint}. See {entry.doc}."
    )
    return Finding(
        code=entry.code,
        name=entry.name,
        level=entry.level,
        message=message,
        hint=entry.hint,
        step=step,
        optimizer=optimizer,
        params=params,
        location=location,
        written_at=written_at,
        cleared_at=cleared_at,
    )


OUTSIDE = "outside any optimizer"
"""``cleared_at`` of gradients no optimizer's ``zero_grad()`` cleared."""


def story(code: str, written_at: str, cleared_at: str, step_at: str) -> str:
    """Every line of the user's code involved, in order: ``backward() at train.py:32 wrote
    them, optimizer.zero_grad() at line 33 cleared them, step() at line 34 applied nothing``.

    Empty when the backward's line is not known.
    """
    if not written_at or code not in ("GG101", "GG102", "GG106"):
        return ""
    if code == "GG106":
        parts = [
            ("backward()", written_at, "wrote them"),
            ("step()", step_at, "applied them with its own"),
        ]
    elif code == "GG101":
        parts = [
            ("backward()", written_at, "added to what a step already applied"),
            ("step()", step_at, "applied both, with no zero_grad() between"),
        ]
    else:
        clear = ("optimizer.zero_grad()", cleared_at, "cleared them")
        if cleared_at == OUTSIDE:  # no line of the user's to name
            clear = ("", "", "something outside any optimizer's zero_grad() cleared them")
        parts = [
            ("backward()", written_at, "wrote them"),
            clear,
            ("step()", step_at, "applied nothing"),
        ]
    told, previous = [], ""
    for call, at, what in parts:
        file, _, line = at.rpartition(":")
        place = f"line {line}" if file and file == previous else at  # same file: the line
        told.append(f"{call} at {place} {what}" if call else what)
        previous = file or previous
    return ", ".join(told)


def _shorten(params: tuple[str, ...], limit: int = 8) -> list[str]:
    """Keep a message one line long however many parameters are involved."""
    if len(params) <= limit:
        return list(params)
    return [*params[:limit], f"... {len(params) - limit} more"]
