"""gradguard: catch gradient-handling bugs in PyTorch training loops while they run.

>>> opt = gradguard.guard(torch.optim.AdamW(model.parameters()), model=model)

Importing gradguard does not import torch: the names that need it (`guard`,
`Guard`, `install`...) import it at their first use, so code that only
catches gradguard's errors or reads its findings (a test suite, a log
processor) never pays for torch's import. `add_sink` and `SinkHandle` come
with the log machinery, also at their first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from gradguard._exceptions import (
    AccumulationMismatchError,
    AccumulationMismatchWarning,
    ClearedBeforeStepError,
    ClearedBeforeStepWarning,
    DiscardedGradientsError,
    DiscardedGradientsWarning,
    EvalModeStepError,
    EvalModeStepWarning,
    ExplodingGradientError,
    ExplodingGradientWarning,
    ForeignGradientError,
    ForeignGradientWarning,
    GradGuardError,
    GradGuardInternalError,
    GradGuardWarning,
    NonFiniteGradientError,
    NonFiniteGradientWarning,
    RankDivergenceError,
    RankDivergenceWarning,
    StaleGradientError,
    StaleGradientWarning,
    StepWithoutBackwardError,
    StepWithoutBackwardWarning,
    UnoptimizedParameterError,
    UnoptimizedParameterWarning,
    UnusedParameterError,
    UnusedParameterWarning,
)
from gradguard._findings import CATALOGUE, Finding
from gradguard._tally import SummaryRow

if TYPE_CHECKING:
    from IPython.core.interactiveshell import InteractiveShell

    from gradguard._api import guard, guard_of, guarding, unguard
    from gradguard._dispatch import SinkHandle, add_sink
    from gradguard._guard import Guard
    from gradguard._session import install, uninstall

_ON_USE = {
    "Guard": "gradguard._guard",
    "SinkHandle": "gradguard._dispatch",
    "add_sink": "gradguard._dispatch",
    "guard": "gradguard._api",
    "guard_of": "gradguard._api",
    "guarding": "gradguard._api",
    "install": "gradguard._session",
    "unguard": "gradguard._api",
    "uninstall": "gradguard._session",
}
"""The public names imported at their first use, and their modules: all but
`_dispatch` import torch."""

__all__ = [
    "CATALOGUE",
    "AccumulationMismatchError",
    "AccumulationMismatchWarning",
    "ClearedBeforeStepError",
    "ClearedBeforeStepWarning",
    "DiscardedGradientsError",
    "DiscardedGradientsWarning",
    "EvalModeStepError",
    "EvalModeStepWarning",
    "ExplodingGradientError",
    "ExplodingGradientWarning",
    "Finding",
    "ForeignGradientError",
    "ForeignGradientWarning",
    "GradGuardError",
    "GradGuardInternalError",
    "GradGuardWarning",
    "Guard",
    "NonFiniteGradientError",
    "NonFiniteGradientWarning",
    "RankDivergenceError",
    "RankDivergenceWarning",
    "SinkHandle",
    "StaleGradientError",
    "StaleGradientWarning",
    "StepWithoutBackwardError",
    "StepWithoutBackwardWarning",
    "SummaryRow",
    "UnoptimizedParameterError",
    "UnoptimizedParameterWarning",
    "UnusedParameterError",
    "UnusedParameterWarning",
    "add_sink",
    "guard",
    "guard_of",
    "guarding",
    "install",
    "load_ipython_extension",
    "unguard",
    "uninstall",
    "unload_ipython_extension",
]

__version__ = "0.1.0"


def load_ipython_extension(ipython: InteractiveShell) -> None:
    """``%load_ext gradguard``: guard every optimizer the notebook steps, and add ``%gradguard``.

    IPython calls it; ``%gradguard strict|warn|log|off`` then sets the mode and
    ``%gradguard summary`` prints what was found. torch is imported here,
    at the first use, as for `install`.
    """
    from gradguard._notebook import load

    load(ipython)


def unload_ipython_extension(ipython: InteractiveShell) -> None:
    """``%unload_ext gradguard``: stop guarding and remove ``%gradguard``."""
    from gradguard._notebook import unload

    unload(ipython)


def _import_on_use(name: str) -> object:
    """The module attribute ``name``, importing its module (and, for most, torch) the first time."""
    module = _ON_USE.get(name)
    if module is None:
        raise AttributeError(f"module 'gradguard' has no attribute {name!r}")
    value: object = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups find it without this function
    return value


if not TYPE_CHECKING:
    # Only at run time: a type checker sees the imports above, and a module
    # `__getattr__` would make it accept any misspelt attribute of gradguard.
    __getattr__ = _import_on_use


def __dir__() -> list[str]:
    return sorted({*globals(), *_ON_USE})
