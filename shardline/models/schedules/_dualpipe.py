"""DualPipeV: DeepSeek's DualPipe (DeepSeek-V3 report, 2024) folded onto half the
devices in a V, as torch 2.13's ``ScheduleDualPipeV`` orders it."""

from __future__ import annotations

from collections import deque

from ._action import Action, Kind
from ._schedule import Schedule, check_sizes, v_placement

__all__ = ["dualpipe_v"]


def dualpipe_v(devices: int, microbatches: int) -> Schedule:
    """DualPipeV: two chunks per device in a V (device ``d`` holds stages ``d`` and
    ``2p - 1 - d``), a zero-bubble warm-up and cool-down, and in the steady state a
    forward of one chunk paired with a full backward of the other. Needs
    ``microbatches >= 2 * devices``.

    The order is torch's ``ScheduleDualPipeV``'s with each ``OVERLAP_F_B`` pair written
    as its forward followed by its backward: what torch's runtime runs for that pair
    too, one after the other. (torch leaves the last device's first pair unpaired; written
    out, a pair and an unpaired F then B are the same two actions.)"""
    p, m = devices, microbatches
    check_sizes(p, m)
    if m < 2 * p:
        raise ValueError(f"DualPipeV needs at least 2 * devices = {2 * p} microbatches, "
                         f"got {m}")
    programs = tuple(_program(p, m, d) for d in range(p))
    return Schedule("dualpipev", p, 2 * p, m, programs, v_placement(p))


def _program(p: int, m: int, d: int) -> tuple[Action, ...]:
    down, up = d, 2 * p - 1 - d
    acts: list[Action] = []
    # the next microbatch per (stage, kind); a full B counts as an I and a W
    count = {(stage, kind): 0 for stage in (down, up) for kind in "FIW"}
    deferred: deque[tuple[int, int]] = deque()  # (stage, mb) whose W is still due

    def add(stage: int, kind: Kind) -> None:
        mb = count[stage, "I" if kind == "B" else kind]
        acts.append(Action(stage, kind, mb))
        if kind == "F":
            count[stage, "F"] += 1
            return
        if kind == "I":
            deferred.append((stage, mb))
        count[stage, "I"] += 1
        count[stage, "W"] += kind == "B"

    def add_deferred_w() -> None:
        if deferred:
            stage, mb = deferred.popleft()
            acts.append(Action(stage, "W", mb))
            count[stage, "W"] += 1

    def overlapped(forward: int, backward: int) -> None:
        add(forward, "F")
        add(backward, "B")

    for _ in range(2 * (p - d - 1)):
        add(down, "F")
    for _ in range(d + 1):
        add(down, "F")
        add(up, "F")
    for _ in range(p - d - 1):
        add(up, "I")
        add_deferred_w()
        add(up, "F")
    for _ in range(m - 2 * p + d + 1):
        overlapped(down, up)
        overlapped(up, down)
    for _ in range(p - d - 1):
        add(up, "B")
        overlapped(up, down)
    split = False  # the last backwards are split, their Ws deferred
    for i in range(d + 1):
        if i == (d + 1) // 2 and d % 2 == 1:
            split = True
        add(up, "I" if split else "B")
        if i == (d + 1) // 2 and d % 2 == 0:
            split = True
        add(down, "I" if split else "B")
    for _ in range(p - d - 1):
        add_deferred_w()
        add(down, "I" if split else "B")
    for _ in range(d + 1):
        add_deferred_w()
    return tuple(acts)
