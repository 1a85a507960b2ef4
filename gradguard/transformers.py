"""A transformers ``TrainerCallback`` that guards the Trainer's optimizer.

>>> from gradguard.transformers import GradGuardCallback
>>> trainer = Trainer(model=model, args=args, train_dataset=data,
...                   callbacks=[GradGuardCallback(mode="strict")])

Compared with ``gradguard run`` or `gradguard.install`, which guard every
optimizer of the process from its second step on, the callback guards the
Trainer's optimizer from its first step, names parameters from the Trainer's
model, declares the Trainer's ``gradient_accumulation_steps`` (GG104 instead
of GG105), adds how often each code fired to the Trainer's logs, and keeps the
findings of one ``train()`` on the callback.
"""

from __future__ import annotations

from typing import Any

try:
    from transformers import TrainerCallback
except ImportError as exc:
    raise ImportError(
        f"gradguard.transformers needs transformers: pip install transformers ({exc})"
    ) from exc

from gradguard._callbacks import CallbackGuards
from gradguard._config import session_mode
from gradguard._dispatch import _log
from gradguard._integrations import callback_handler

__all__ = ["LOG_PREFIX", "GradGuardCallback"]

LOG_PREFIX = "gradguard/"
"""What the keys the callback adds to the Trainer's logs start with: ``gradguard/GG102``."""


class GradGuardCallback(CallbackGuards, TrainerCallback):
    """Guard the Trainer's optimizer for the length of each ``train()``.

    The guard is attached at ``on_train_begin``, once the Trainer has built
    its optimizer and Accelerate has wrapped it (the optimizer inside the
    ``AcceleratedOptimizer`` is the one guarded), so the first step is judged;
    ``on_train_end`` reports anything pending and removes every hook. In
    between, each of the Trainer's logs gets ``gradguard/<code>``: how many
    times that code fired so far in this ``train()``, for each code that did
    (an int, which every reporting integration records as a scalar; a clean
    run adds nothing). So that the integrations see them, the callback moves
    itself first among the Trainer's callbacks when training begins; it never
    changes the Trainer's control flow.

    A strict finding stops ``train()`` with its error, after which the Trainer
    calls no callback: the guard stays until `close`, the next ``train()`` or
    the optimizer's collection.

    Args:
        mode: ``"warn"``, ``"strict"`` or ``"log"``; omitted, the active
            runner's or pytest plugin's mode, else ``"warn"``.
        ignore: finding codes to silence.
        **options: any other option of `gradguard.guard` (``check_numerics``,
            ``max_grad_norm``, ``unused_after``, ``check_ranks_every``, ...).
            ``accumulation_steps`` defaults to the Trainer's
            ``args.gradient_accumulation_steps``.

    Raises:
        TypeError, ValueError: a bad option, at construction.
    """

    _training = False  # between on_train_begin and the guard's closing

    def counts(self) -> dict[str, int]:
        """How many times each code fired in the current or last ``train()``, sorted by code."""
        out: dict[str, int] = {}
        for row in self.summary():
            out[row.code] = out.get(row.code, 0) + row.count
        return dict(sorted(out.items()))

    def close(self) -> None:
        """Report anything pending and remove the guards now; idempotent.

        For a ``train()`` that stopped on an exception, which the Trainer
        tells no callback. Raises a strict finding judged while closing, as
        `gradguard.unguard` does.
        """
        self._training = False
        self._close()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Guard the Trainer's optimizer, which exists by now, before its first step."""
        self._close(reraise=False)  # left by a train() that raised: start this one afresh
        try:
            self._lead()
        except Exception as exc:  # the counts may miss some callbacks' logs; nothing else
            _internal_error(exc, "moving the callback first")
        accumulate = getattr(args, "gradient_accumulation_steps", 1)
        try:
            self._attach([kwargs.get("optimizer")], kwargs.get("model"), accumulate)
        except Exception as exc:  # an optimizer gradguard cannot hook (DeepSpeed's)
            if (session_mode() if self.mode is None else self.mode) == "strict":
                raise
            _log().warning(
                "optimizer-not-guarded",
                error=f"{type(exc).__name__}: {exc}",
                note="gradguard does not watch this Trainer's optimizer; training continues",
            )
            return
        self._training = True

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        """Add ``gradguard/<code>`` to the logs for each code found so far in this ``train()``."""
        if not self._training or not isinstance(logs, dict):
            return
        for g in self.guards:
            g.settle()  # results still on the device; the Trainer's logging synced already
        try:
            self._publish(state, logs)
        except Exception as exc:  # the logs go on without the counts, never the job
            _internal_error(exc, "adding counts to the Trainer's logs")

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Report anything pending and remove the guard this callback attached."""
        self.close()

    def _lead(self) -> None:
        """Move this callback first, so every callback's ``on_log`` sees the counts.

        The Trainer puts the reporting integrations (TensorBoard, W&B, MLflow,
        ...) ahead of the callbacks it is given, and each reads the logs when
        called. The handler is iterating its list at this callback's index
        now: moving it to the front leaves every later callback at its index,
        so none is skipped or called twice.
        """
        handler = callback_handler(self)
        if handler is None:  # called by something other than a Trainer
            return
        callbacks = handler.callbacks
        at = next(i for i, c in enumerate(callbacks) if c is self)
        callbacks.insert(0, callbacks.pop(at))

    def _publish(self, state: Any, logs: dict[str, Any]) -> None:
        """Put the counts in ``logs`` and in the history entry the Trainer made of it."""
        counts = self.counts()
        if not counts:
            return
        fields = {LOG_PREFIX + code: n for code, n in counts.items()}
        # Trainer.log appends a copy of the logs (plus "step") to the history
        # before any callback sees them: the entry holding the very same values.
        history = getattr(state, "log_history", None)
        entry = history[-1] if isinstance(history, list) and history else None
        if isinstance(entry, dict) and logs and all(entry.get(k) is v for k, v in logs.items()):
            entry.update(fields)
        logs.update(fields)


def _internal_error(exc: Exception, where: str) -> None:
    _log().error(
        "internal-error",
        where=where,
        error=f"{type(exc).__name__}: {exc}",
        note="training continues unchanged",
    )
