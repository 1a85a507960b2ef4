"""gradguard: catch gradient-handling bugs in PyTorch training loops while they run.

>>> opt = gradguard.guard(torch.optim.AdamW(model.parameters()), model=model)
"""

from __future__ import annotations

from gradguard._api import guard, guard_of, guarding, unguard
from gradguard._dispatch import SummaryRow
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
from gradguard._guard import Guard
from gradguard._session import install, uninstall

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
    "GradGuardError",
    "GradGuardInternalError",
    "GradGuardWarning",
    "Guard",
    "NonFiniteGradientError",
    "NonFiniteGradientWarning",
    "RankDivergenceError",
    "RankDivergenceWarning",
    "StaleGradientError",
    "StaleGradientWarning",
    "StepWithoutBackwardError",
    "StepWithoutBackwardWarning",
    "SummaryRow",
    "UnoptimizedParameterError",
    "UnoptimizedParameterWarning",
    "UnusedParameterError",
    "UnusedParameterWarning",
    "guard",
    "guard_of",
    "guarding",
    "install",
    "unguard",
    "uninstall",
]

__version__ = "0.1.0"
