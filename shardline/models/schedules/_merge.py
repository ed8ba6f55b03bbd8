"""What a runtime may run as one backward: an ``I`` whose gradient goes to a stage on
the same device, followed at once by its own ``W``."""

from __future__ import annotations

from dataclasses import replace

from ._action import Action
from ._schedule import Schedule

__all__ = ["merge_local_backwards"]


def merge_local_backwards(schedule: Schedule) -> Schedule:
    """``schedule`` with every ``I`` that its own ``W`` follows at once written as one
    ``B``, when the input gradient that ``I`` makes stays on the device: its stage's
    predecessor lives on the same device (the bottom of a V).

    Splitting a backward only pays when another device waits for the input gradient
    while the weight gradient is still to come. Here none does: the only consumer of
    that gradient is a later action of this same device, which runs after the ``W``
    anyway. So every action starts no later than before, while the split's own cost
    (two autograd passes instead of one, the graph kept between them) is saved, and
    the activations are freed one action earlier. With ``B = I + W`` the simulated
    makespan is the same; every other action is kept as it was, so the orders that
    match torch pipelining's keep matching them. (Stage 0 sends no input gradient
    either, but its ``I`` is already free: its ``W`` runs the whole backward in one
    pass.)"""
    programs = []
    for d, acts in enumerate(schedule.actions):
        out: list[Action] = []
        i = 0
        while i < len(acts):
            a = acts[i]
            if (a.kind == "I" and i + 1 < len(acts)
                    and acts[i + 1] == Action(a.stage, "W", a.mb)
                    and a.stage > 0 and schedule.device_of(a.stage - 1) == d):
                out.append(Action(a.stage, "B", a.mb))
                i += 2
                continue
            out.append(a)
            i += 1
        programs.append(tuple(out))
    return replace(schedule, actions=tuple(programs))
