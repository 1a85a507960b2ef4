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
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from gradguard._api import attach, guard_of
from gradguard._config import OPTION_NAMES, make_options
from gradguard._findings import Finding
from gradguard._guard import Guard
from gradguard._tally import SummaryRow

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


class GradGuardCallback(Callback):
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

    def __init__(
        self, *, mode: str | None = None, ignore: Iterable[str] | None = None, **options: Any
    ) -> None:
        super().__init__()
        unknown = sorted(set(options) - set(OPTION_NAMES))
        if unknown:
            raise TypeError(
                f"GradGuardCallback() got an unknown option {unknown[0]!r}; "
                f"it takes {', '.join(OPTION_NAMES)}"
            )
        # Checked here, not in fit; a mode or codes left out come from the session then.
        checked = make_options(mode="warn" if mode is None else mode, ignore=ignore, **options)
        self.mode = mode
        self.ignore = None if ignore is None else sorted(checked.ignore)
        self.options = options
        self.guards: list[Guard] = []
        self._owned: list[Guard] = []

    @property
    def findings(self) -> list[Finding]:
        """Every distinct finding of this callback's guards, guard by guard."""
        return [f for g in self.guards for f in g.findings]

    def summary(self) -> list[SummaryRow]:
        """Per guard and code: count, first step, first location and the fix."""
        return [row for g in self.guards for row in g.summary()]

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Attach a guard to each of the Trainer's optimizers."""
        options = dict(self.options)
        accumulate = getattr(trainer, "accumulate_grad_batches", 1)
        if isinstance(accumulate, int) and accumulate > 1:
            options.setdefault("accumulation_steps", accumulate)
        self.guards, self._owned = [], []
        for optimizer in trainer.optimizers:
            existing = guard_of(optimizer)
            g = attach(optimizer, model=pl_module, mode=self.mode, ignore=self.ignore, **options)
            self.guards.append(g)
            if existing is None:
                self._owned.append(g)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Report anything pending and remove the guards this callback attached."""
        self._close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Remove the guards when ``fit`` stops on an exception (a strict finding included)."""
        self._close(reraise=False)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Remove the guards if nothing else did."""
        self._close()

    def _close(self, reraise: bool = True) -> None:
        owned, self._owned = self._owned, []
        error: BaseException | None = None
        for g in owned:
            try:
                g.close()
            except Exception as exc:  # a strict finding still being computed
                error = error or exc
        if error is not None and reraise:
            raise error
