"""Interleaved 1F1B (Narayanan et al., 2021, Megatron-LM): several model chunks per
device, visited round-robin."""

from __future__ import annotations

from ._action import Action
from ._schedule import Schedule, check_sizes

__all__ = ["interleaved_1f1b"]


def interleaved_1f1b(stages: int, microbatches: int, chunks: int = 2) -> Schedule:
    """Interleaved 1F1B (Megatron-LM): each of ``stages`` devices holds ``chunks`` model
    chunks, device ``d`` stages ``d, d + p, ...``; microbatches go round in groups of
    ``stages``. Needs ``microbatches % stages == 0``. With equal costs its bubble is
    ``chunks`` times smaller than 1F1B's. The order is torch's
    ``ScheduleInterleaved1F1B``'s, action for action."""
    p, m, v = stages, microbatches, chunks
    check_sizes(p, m)
    if v < 1:
        raise ValueError(f"chunks must be >= 1, got {v}")
    if m % p:
        raise ValueError(f"interleaved 1F1B needs microbatches ({m}) divisible by stages ({p})")
    total = m * v

    def forward(d: int, k: int) -> Action:
        chunk = (k // p) % v
        return Action(chunk * p + d, "F", (k // (p * v)) * p + k % p)

    def backward(d: int, k: int) -> Action:
        chunk = v - 1 - (k // p) % v
        return Action(chunk * p + d, "B", (k // (p * v)) * p + k % p)

    programs = []
    for d in range(p):
        warmup = min((p - d - 1) * 2 + (v - 1) * p, total)
        acts = [forward(d, k) for k in range(warmup)]
        for b in range(total - warmup):
            acts.append(forward(d, warmup + b))
            acts.append(backward(d, b))
        acts.extend(backward(d, k) for k in range(total - warmup, total))
        programs.append(tuple(acts))
    return Schedule("interleaved-1f1b", p, p * v, m, tuple(programs))
