"""Zero-bubble schedules (Qi et al., "Zero Bubble Pipeline Parallelism", ICLR 2024): the
backward split into ``I`` (input gradient, on the critical path) and ``W`` (weight
gradient, deferred into what would have been the bubble)."""

from __future__ import annotations

from ._action import Action, Kind
from ._schedule import Schedule, check_sizes, v_placement

__all__ = ["zb_h1", "zbv"]


def zb_h1(stages: int, microbatches: int) -> Schedule:
    """ZB-H1 ("ZB1P"): 1F1B with the backward split, device ``s`` starting its ``W``s
    ``s`` backwards late. Every device then holds at most ``p`` microbatches (1F1B's peak,
    which only its first device reaches), and with ``F = I = W`` each device idles
    ``p - 1`` units against 1F1B's ``3 (p - 1)``.

    The order is torch's ``ScheduleInterleavedZeroBubble`` with one stage per rank, action
    for action; unlike torch it needs no ``microbatches % rounds == 0``."""
    p, m = stages, microbatches
    check_sizes(p, m)
    programs = []
    for s in range(p):
        warmup = min(p - s - 1, m)
        acts = [Action(s, "F", mb) for mb in range(warmup)]
        w = 0
        for b in range(m):
            if warmup + b < m:
                acts.append(Action(s, "F", warmup + b))
            acts.append(Action(s, "I", b))
            if b >= s:
                acts.append(Action(s, "W", w))
                w += 1
        acts.extend(Action(s, "W", mb) for mb in range(w, m))
        programs.append(tuple(acts))
    return Schedule("zb-h1", p, p, m, tuple(programs))


def zbv(devices: int, microbatches: int) -> Schedule:
    """ZB-V: two chunks per device in a V (device ``d`` holds stages ``d`` and
    ``2p - 1 - d``), so ``2p`` stages; with ``F = I = W`` its bubble is smaller than
    ZB-H1's at 1F1B's peak activation memory (counted in device-full stages: ``2p``
    chunks of half a device each on the first device).

    The order is torch's ``ScheduleZBVZeroBubble``, action for action: it is generated
    for ``max(m, 2p - 1)`` microbatches and those past ``m`` dropped, which keeps it
    deadlock-free for any ``m`` (dependencies never cross microbatches)."""
    p, m = devices, microbatches
    check_sizes(p, m)
    programs = tuple(_zbv_program(p, max(2 * p - 1, m), d, m) for d in range(p))
    return Schedule("zbv", p, 2 * p, m, programs, v_placement(p))


def _zbv_program(p: int, n: int, d: int, m: int) -> tuple[Action, ...]:
    """Device ``d``'s ZB-V program for ``n`` microbatches, cut to the first ``m``."""
    down, up = d, 2 * p - 1 - d
    acts: list[Action] = []
    count = {(stage, kind): 0 for stage in (down, up) for kind in "FIW"}

    def add(stage: int, *kinds: Kind) -> None:
        for kind in kinds:
            acts.append(Action(stage, kind, count[stage, kind]))
            count[stage, kind] += 1

    for _ in range(2 * (p - d) - 1):
        add(down, "F")
    for _ in range(d):
        add(up, "F")
        add(down, "F")
    for _ in range(p - d):
        add(up, "F", "I", "W")
    while count[up, "F"] < count[down, "F"] or count[down, "F"] < n:
        if count[down, "F"] < n:
            add(down, "F")
        add(down, "I", "W")
        add(up, "F", "I", "W")
    for _ in range(d):
        add(down, "I")
        add(up, "I")
    for _ in range(p - d):
        add(down, "I", "W")
    while count[up, "W"] < count[up, "I"]:
        add(up, "W")
    while count[down, "W"] < count[down, "I"]:
        add(down, "W")
    return tuple(a for a in acts if a.mb < m)
