"""What gradguard's callbacks for training frameworks share.

Such a callback checks its options where it is constructed, attaches a guard
to each of the Trainer's optimizers when training starts and closes the ones
it attached when training ends; its `findings` and `summary()` stay readable
after. The frameworks' own base classes stay in the modules that subclass them
(`gradguard.lightning`, `gradguard.transformers`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from gradguard._api import attach, guard_of
from gradguard._config import OPTION_NAMES, make_options
from gradguard._findings import Finding
from gradguard._guard import Guard
from gradguard._tally import SummaryRow


class CallbackGuards:
    """The options of a framework's callback and the guards it attached for one run.

    First in the callback's bases, so that its ``__init__`` is the callback's.
    """

    def __init__(
        self, *, mode: str | None = None, ignore: Iterable[str] | None = None, **options: Any
    ) -> None:
        """Check the options now, not when training starts; raise naming the bad one.

        A mode or codes left out come from the active session when training starts.
        """
        super().__init__()  # the framework's callback base, next in the subclass's bases
        unknown = sorted(set(options) - set(OPTION_NAMES))
        if unknown:
            raise TypeError(
                f"{type(self).__name__}() got an unknown option {unknown[0]!r}; "
                f"it takes {', '.join(OPTION_NAMES)}"
            )
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

    def _attach(self, optimizers: Iterable[Any], model: Any, accumulate: object) -> None:
        """Guard each optimizer for this run; ``accumulate`` is the framework's window.

        The window is declared unless the options name one; a guard that was
        already watching an optimizer is used, and left open at the end.
        """
        options = dict(self.options)
        if isinstance(accumulate, int) and not isinstance(accumulate, bool) and accumulate > 1:
            options.setdefault("accumulation_steps", accumulate)
        self.guards, self._owned = [], []
        for optimizer in optimizers:
            existing = guard_of(optimizer)
            g = attach(optimizer, model=model, mode=self.mode, ignore=self.ignore, **options)
            self.guards.append(g)
            if existing is None:
                self._owned.append(g)

    def _close(self, reraise: bool = True) -> None:
        """Close the guards this callback attached, every one even if one raises.

        The first error (a strict finding judged at close) is raised once all
        are closed, unless ``reraise`` is false.
        """
        owned, self._owned = self._owned, []
        error: BaseException | None = None
        for g in owned:
            try:
                g.close()
            except Exception as exc:  # a strict finding still being computed
                error = error or exc
        if error is not None and reraise:
            raise error
