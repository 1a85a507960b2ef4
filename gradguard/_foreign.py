"""GG106: a step applying gradients that a backward wrote for another update.

Judged from what each slot notes about the backward passes accumulated in
its gradient since the last step or clear, its window (`Slot.since`,
`Slot.last`, `Slot.modes`), and from the steps of the other optimizers:

* **The validation leak.** The window holds a pass run while a watched model
  was in eval mode and one run in train mode: a validation pass called
  ``backward()`` and nothing cleared it, so training's next step applies the
  validation batches too.
* **The GAN leak.** The pass that began the window also wrote into another
  optimizer's parameters, that optimizer stepped it, and a later pass
  accumulated onto it here: a generator's backward through the
  discriminator, left in the discriminator's gradients, applied by the
  discriminator's next step with its own.

One backward shared by two optimizers that step at different rates has the
same shape; it is told apart by the later passes, which write into both
optimizers' parameters. So a GAN whose discriminator backward also writes
into the generator (no ``detach()``) is not reported, and neither is a
backward that joined the window after its first pass: only the pass that
began it is looked at.
"""

from __future__ import annotations

import dataclasses
import operator
import weakref
from collections import deque
from itertools import compress

import torch

from gradguard._naming import Location
from gradguard._process import keep
from gradguard._tracker import EVAL, REGISTRY, TRAIN, Slot

MIXED = TRAIN | EVAL
_SINCE = operator.attrgetter("since")
_LAST = operator.attrgetter("last")
_FRESH = operator.attrgetter("fresh")
_MODES = operator.attrgetter("modes")


@dataclasses.dataclass(frozen=True)
class _Stepped:
    """One step of an optimizer while several were judged: which passes it applied."""

    owner: weakref.ref[Foreign]
    passes: frozenset[int]  # passes known to have written what it applied (first and last)
    at: int  # the backward passes run before it
    label: str  # the optimizer's, for the message


@dataclasses.dataclass(frozen=True)
class Leak:
    """Parameters a step applies a foreign backward's gradient to, and that backward."""

    params: list[torch.Tensor]
    written_at: Location | None  # where the foreign backward was called
    detail: str


# The latest steps of every optimizer, while more than one is judged.
_STEPPED: deque[_Stepped] = keep("steps of several optimizers", deque(maxlen=64), cache=True)
LIVE: dict[int, weakref.ref[Foreign]] = keep("optimizers judged for GG106", {})
"""Every open `Foreign`: with more than one, each step is noted in the log of steps."""


class Foreign:
    """GG106 for one optimizer: its windows against the other optimizers' steps."""

    def __init__(self, label: str, slots: dict[int, Slot]) -> None:
        self._label = label
        self._slots = slots  # the guard's; read here, never written
        LIVE[id(self)] = weakref.ref(self)

    def judge(self, params: list[torch.Tensor], slots: list[Slot], micro: int) -> list[Leak]:
        """The leaks in what a step applies: ``params``, fresh from backward, and their
        ``slots``; ``micro``, the most passes any of them accumulated."""
        if len(LIVE) > 1:
            fresh = list(compress(slots, map(_FRESH, slots)))
            passes = frozenset(map(_SINCE, fresh)) | frozenset(map(_LAST, fresh))
            _STEPPED.append(_Stepped(weakref.ref(self), passes, REGISTRY.passes, self._label))
        if micro < 2:
            return []
        leaks = self._validation(params, slots)
        return leaks + self._gan(params, slots) if len(LIVE) > 1 else leaks

    def close(self) -> None:
        """Stop taking part in the log of steps; idempotent."""
        LIVE.pop(id(self), None)

    def _validation(self, params: list[torch.Tensor], slots: list[Slot]) -> list[Leak]:
        if MIXED not in map(_MODES, slots):  # at C speed: the usual answer
            return []
        mixed = [(p, s) for p, s in zip(params, slots, strict=True) if s.modes == MIXED]
        where = REGISTRY.turned(EVAL, max(s.last for _, s in mixed))
        detail = "a validation backward in eval mode, then training's added to it"
        return [Leak([p for p, _ in mixed], where, detail)]

    def _gan(self, params: list[torch.Tensor], slots: list[Slot]) -> list[Leak]:
        """Windows begun by a pass another optimizer stepped before a later pass joined it,
        when no pass from that later one on wrote into the other optimizer's parameters.

        The usual steps of several optimizers sharing backward passes end at C speed:
        no other optimizer stepped since a window began, or every window's passes also
        wrote into the other optimizer's parameters.
        """
        joined = list(map(operator.lt, map(_SINCE, slots), map(_LAST, slots)))
        if True not in joined:
            return []
        began = set(map(_SINCE, compress(slots, joined)))
        began.discard(0)  # a gradient there before gradguard watched: no pass to match
        latest = max(map(_LAST, compress(slots, joined)))
        found: dict[tuple[int, str], list[torch.Tensor]] = {}
        windows: list[tuple[torch.Tensor, Slot]] | None = None
        for entry in list(_STEPPED):
            if entry.at >= latest or not entry.passes & began:
                continue
            other = entry.owner()
            if other is None or other is self:
                continue
            theirs = other._slots
            written = max(map(_LAST, theirs.values()), default=0)
            if written >= latest:
                continue  # every window's last pass also wrote into theirs: shared
            if windows is None:
                pairs = compress(zip(params, slots, strict=True), joined)
                windows = [(p, s) for p, s in pairs if s.since > 0]
            for p, s in windows:
                if (
                    s.since in entry.passes
                    and entry.at < s.last
                    and written < s.last
                    and id(p) not in theirs
                ):
                    found.setdefault((s.since, entry.label), []).append(p)
        return [
            Leak(
                _once(found_params),
                REGISTRY.line_of(backward),
                f"the backward of {label}'s update: {label} stepped it, "
                "then this optimizer's own backward added to it",
            )
            for (backward, label), found_params in found.items()
        ]


def _once(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """``params`` in order, each once."""
    return list({id(p): p for p in params}.values())
