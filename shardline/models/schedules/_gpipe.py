"""GPipe (Huang et al., 2019): every forward, then every backward."""

from __future__ import annotations

from ._action import Action
from ._schedule import Schedule, check_sizes

__all__ = ["gpipe"]


def gpipe(stages: int, microbatches: int) -> Schedule:
    """GPipe: all forwards, then all backwards, the backwards in reverse microbatch order
    (the last forward's activations are the freshest; torch's ``ScheduleGPipe`` runs them
    in forward order instead, which costs the same)."""
    check_sizes(stages, microbatches)
    acts = tuple(
        tuple(Action(s, "F", mb) for mb in range(microbatches))
        + tuple(Action(s, "B", mb) for mb in reversed(range(microbatches)))
        for s in range(stages))
    return Schedule("gpipe", stages, stages, microbatches, acts)
