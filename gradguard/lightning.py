"""A PyTorch Lightning callback that guards every optimizer of a Trainer.

>>> from gradguard.lightning import GradGuardCallback
>>> trainer = Trainer(callbacks=[GradGuardCallback(mode="strict")])

Compared with ``gradguard run`` or `gradguard.install`, which guard every
optimizer of the process from its second step on, the callback guards the
Trainer's optimizers from their first step, names parameters from the
LightningModule, declares the Trainer's ``accumulate_grad_batches`` (GG104
instead of GG105), can compare ranks (``check_ranks_every``, GG401), and keeps
the findings of one ``fit`` on the callback.

Subclasses the ``Callback`` of ``lightning.pytorch`` or ``pytorch_lightning``:
whichever the process imported first, else whichever is installed.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

from gradguard._callbacks import CallbackGuards

if TYPE_CHECKING:
    from pytorch_lightning import Callback
else:

    def _callback_base() -> type:
        names = ("lightning.pytorch", "pytorch_lightning")
        imported = [n for n in names if n in sys.modules]
        for name in [*imported, *names]:
            try:
                return importlib.import_module(name).Callback  # type: ignore[no-any-return]
            except ImportError:
                continue
        raise ImportError(
            "gradguard.lightning needs PyTorch Lightning: pip install lightning "
            "(or pytorch-lightning)"
        )

    Callback = _callback_base()

__all__ = ["GradGuardCallback"]


class GradGuardCallback(CallbackGuards, Callback):
    """Guard the Trainer's optimizers for the length of each ``fit``.

    Args:
        mode: ``"warn"``, ``"strict"`` or ``"log"``; omitted, the active
            runner's or pytest plugin's mode, else ``"warn"``.
        ignore: finding codes to silence.
        **options: any other option of `gradguard.guard` (``check_ranks_every``,
            ``check_numerics``, ``max_grad_norm``, ...). ``accumulation_steps``
            defaults to the Trainer's ``accumulate_grad_batches``.

    Raises:
        TypeError, ValueError: a bad option, at construction.
    """

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Attach a guard to each of the Trainer's optimizers."""
        accumulate = getattr(trainer, "accumulate_grad_batches", 1)
        self._attach(trainer.optimizers, pl_module, accumulate)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Report anything pending and remove the guards this callback attached."""
        self._close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Remove the guards when ``fit`` stops on an exception (a strict finding included)."""
        self._close(reraise=False)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Remove the guards if nothing else did."""
        self._close()
