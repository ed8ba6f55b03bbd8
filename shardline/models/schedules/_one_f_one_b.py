"""1F1B (PipeDream-Flush, Narayanan et al., 2021): warm up, then alternate one forward
and one backward."""

from __future__ import annotations

from ._action import Action
from ._schedule import Schedule, check_sizes

__all__ = ["one_f_one_b"]


def one_f_one_b(stages: int, microbatches: int) -> Schedule:
    """1F1B: stage ``s`` warms up with ``p - s - 1`` forwards, then alternates one
    forward and one backward, so it never holds more than ``p - s`` microbatches'
    activations.

    This is the order torch's ``Schedule1F1B`` runs. Its ``pipeline_order`` (the table
    torch prints and simulates, not what its runtime reads) differs on the last rank
    only, numbering the forwards ``1..m`` instead of ``0..m-1``."""
    check_sizes(stages, microbatches)
    programs = []
    for s in range(stages):
        warmup = min(stages - s - 1, microbatches)
        acts = [Action(s, "F", mb) for mb in range(warmup)]
        for b in range(microbatches - warmup):
            acts.append(Action(s, "F", warmup + b))
            acts.append(Action(s, "B", b))
        acts.extend(Action(s, "B", mb) for mb in range(microbatches - warmup, microbatches))
        programs.append(tuple(acts))
    return Schedule("1f1b", stages, stages, microbatches, tuple(programs))
