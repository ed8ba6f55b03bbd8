"""Errors of the model layer."""

from __future__ import annotations

from .._errors import ShardlineError

__all__ = ["PipelineError", "PlanError", "RecoveryFailed"]


class PipelineError(ShardlineError):
    """A stage failed (raised, or its node was lost) during a step. ``stage`` is the
    device index of the first stage that failed (in replica ``replica``); the original
    error is ``__cause__``."""

    def __init__(self, message: str, stage: int, replica: int = 0) -> None:
        super().__init__(message)
        self.stage = stage
        self.replica = replica
        self.recovered = False
        """Set when the pipeline replaced the lost node after this failure: a request
        whose state was on it can be replayed."""


class PlanError(ShardlineError, ValueError):
    """No plan satisfies what was asked (not enough spares, a bad placement)."""


class RecoveryFailed(PipelineError):
    """Rebuilding lost stages did not finish: another node was lost meanwhile, or the
    rebuild ran past its deadline. The pipeline is as it was before the attempt (the
    lost stages still lost), so the next call tries again."""
