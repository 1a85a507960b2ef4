"""Warning and exception classes, one pair per finding code.

Every class reports ``__module__ == "gradguard"`` so that warning filters such as
``-W "ignore::gradguard.StaleGradientWarning"`` resolve against the public name.
"""

from __future__ import annotations

from gradguard._findings import Finding


class GradGuardWarning(UserWarning):
    """Base class of every warning gradguard emits in ``mode="warn"``."""

    finding: Finding

    def __init__(self, finding: Finding) -> None:
        super().__init__(finding.message)
        self.finding = finding


class GradGuardError(RuntimeError):
    """Base class of every error gradguard raises in ``mode="strict"``.

    ``finding`` holds the structured report; it is ``None`` only for
    `GradGuardInternalError`, raised when gradguard itself failed.
    """

    finding: Finding | None

    def __init__(self, message: str, finding: Finding | None = None) -> None:
        super().__init__(message)
        self.finding = finding


class GradGuardInternalError(GradGuardError):
    """gradguard failed internally in strict mode; the guard has been disabled."""


class StaleGradientWarning(GradGuardWarning):
    """GG101: a step applied gradients that an earlier step already applied."""


class StaleGradientError(GradGuardError):
    """GG101: a step applied gradients that an earlier step already applied."""


class ClearedBeforeStepWarning(GradGuardWarning):
    """GG102: gradients were cleared between backward() and step()."""


class ClearedBeforeStepError(GradGuardError):
    """GG102: gradients were cleared between backward() and step()."""


class StepWithoutBackwardWarning(GradGuardWarning):
    """GG103: step() ran with no gradient produced since the previous step."""


class StepWithoutBackwardError(GradGuardError):
    """GG103: step() ran with no gradient produced since the previous step."""


class AccumulationMismatchWarning(GradGuardWarning):
    """GG104: the declared accumulation window was not respected."""


class AccumulationMismatchError(GradGuardError):
    """GG104: the declared accumulation window was not respected."""


class DiscardedGradientsWarning(GradGuardWarning):
    """GG105: backward results were repeatedly cleared before any step."""


class DiscardedGradientsError(GradGuardError):
    """GG105: backward results were repeatedly cleared before any step."""


class ForeignGradientWarning(GradGuardWarning):
    """GG106: a step applied gradients a backward wrote for another update."""


class ForeignGradientError(GradGuardError):
    """GG106: a step applied gradients a backward wrote for another update."""


class NonFiniteGradientWarning(GradGuardWarning):
    """GG201: a step is applying NaN or Inf gradients."""


class NonFiniteGradientError(GradGuardError):
    """GG201: a step is applying NaN or Inf gradients."""


class ExplodingGradientWarning(GradGuardWarning):
    """GG202: the gradient norm exploded, by a jump or a sustained rise."""


class ExplodingGradientError(GradGuardError):
    """GG202: the gradient norm exploded, by a jump or a sustained rise."""


class UnusedParameterWarning(GradGuardWarning):
    """GG301: optimizer parameters never received a gradient."""


class UnusedParameterError(GradGuardError):
    """GG301: optimizer parameters never received a gradient."""


class UnoptimizedParameterWarning(GradGuardWarning):
    """GG302: model parameters get gradients but no optimizer updates them."""


class UnoptimizedParameterError(GradGuardError):
    """GG302: model parameters get gradients but no optimizer updates them."""


class EvalModeStepWarning(GradGuardWarning):
    """GG303: a step trains a model that is in eval mode."""


class EvalModeStepError(GradGuardError):
    """GG303: a step trains a model that is in eval mode."""


class RankDivergenceWarning(GradGuardWarning):
    """GG401: data-parallel ranks are about to apply different gradients."""


class RankDivergenceError(GradGuardError):
    """GG401: data-parallel ranks are about to apply different gradients."""


WARNINGS: dict[str, type[GradGuardWarning]] = {
    "GG101": StaleGradientWarning,
    "GG102": ClearedBeforeStepWarning,
    "GG103": StepWithoutBackwardWarning,
    "GG104": AccumulationMismatchWarning,
    "GG105": DiscardedGradientsWarning,
    "GG106": ForeignGradientWarning,
    "GG201": NonFiniteGradientWarning,
    "GG202": ExplodingGradientWarning,
    "GG301": UnusedParameterWarning,
    "GG302": UnoptimizedParameterWarning,
    "GG303": EvalModeStepWarning,
    "GG401": RankDivergenceWarning,
}

ERRORS: dict[str, type[GradGuardError]] = {
    "GG101": StaleGradientError,
    "GG102": ClearedBeforeStepError,
    "GG103": StepWithoutBackwardError,
    "GG104": AccumulationMismatchError,
    "GG105": DiscardedGradientsError,
    "GG106": ForeignGradientError,
    "GG201": NonFiniteGradientError,
    "GG202": ExplodingGradientError,
    "GG301": UnusedParameterError,
    "GG302": UnoptimizedParameterError,
    "GG303": EvalModeStepError,
    "GG401": RankDivergenceError,
}

for _cls in (
    GradGuardWarning,
    GradGuardError,
    GradGuardInternalError,
    *WARNINGS.values(),
    *ERRORS.values(),
):
    _cls.__module__ = "gradguard"
