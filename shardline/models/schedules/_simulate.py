"""Play a schedule with given costs: when each action would start and end, the bubble,
and how many microbatches each device holds at its peak."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ._action import Action
from ._schedule import Schedule

__all__ = ["Simulation", "Span", "simulate"]


@dataclass(frozen=True)
class Span:
    device: int
    action: Action
    start: float
    end: float


@dataclass(frozen=True)
class Simulation:
    makespan: float
    bubble_fraction: float
    """Idle share of the devices' time: 1 - busy / (devices x makespan)."""
    peak_activations: tuple[int, ...]
    """Per device: most microbatch-chunks held at once, each from its ``F`` until its
    ``B``, or until its ``W`` when the backward is split (an ``I`` frees nothing)."""
    spans: tuple[Span, ...] = field(repr=False)

    @property
    def ideal(self) -> float:
        """Makespan with no bubble: one device's total work."""
        return self.makespan * (1 - self.bubble_fraction)

    @property
    def idle(self) -> tuple[float, ...]:
        """Per device: the makespan minus the time it computed."""
        busy = [0.0] * len(self.peak_activations)
        for s in self.spans:
            busy[s.device] += s.end - s.start
        return tuple(self.makespan - b for b in busy)


def simulate(schedule: Schedule, forward_cost: float = 1.0,
             backward_cost: float = 2.0, comm_cost: float = 0.0, *,
             weight_cost: float = 0.0,
             durations: Mapping[tuple[int, str, int], float] | None = None) -> Simulation:
    """Play the schedule, each device running its program in order and each action
    starting as soon as the device is free and its inputs are there.

    Costs are per *device-full stage*, the share of the model one device holds:
    ``forward_cost`` for an ``F``, ``backward_cost`` for an ``I`` (the input gradient),
    ``weight_cost`` for a ``W`` (the weight gradient), and both for a full ``B``. A
    schedule with ``chunks`` stages per device (interleaved, V-shaped) cuts a device's
    share into that many stages, so each of its actions costs ``1/chunks`` of those: the
    work per device, and so the ideal makespan, is the same for every schedule.
    ``comm_cost`` is added for every hop between two devices (none between two stages
    on one device).

    Dependencies: ``F`` of stage ``s`` after ``F`` of ``s - 1``; ``B`` or ``I`` after the
    stage's own ``F`` and after ``B`` or ``I`` of ``s + 1``; ``W`` after its ``I``.

    ``durations`` overrides the cost of single actions, keyed ``(stage, kind, mb)``:
    given the durations a real step measured (``StepTrace.durations()``), the makespan is
    what that step would have taken with no scheduling or communication overhead at all.
    Where the runtime ran an ``I`` and its ``W`` as one ``B`` (``merge_local_backwards``),
    that ``B``'s duration counts for the ``I`` and the ``W`` costs nothing, which plays
    the merged program.

    Raises ``ValueError`` if the schedule is invalid or deadlocks.
    """
    schedule.validate()
    if min(forward_cost, backward_cost, weight_cost, comm_cost) < 0:
        raise ValueError("costs must be >= 0")
    durations = durations or {}
    v = schedule.chunks
    cost = {"F": forward_cost / v, "I": backward_cost / v, "W": weight_cost / v,
            "B": (backward_cost + weight_cost) / v}
    last = schedule.n_stages - 1
    forward_done: dict[tuple[int, int], float] = {}
    grad_done: dict[tuple[int, int], float] = {}  # B or I: the input gradient is out
    input_grad_done: dict[tuple[int, int], float] = {}
    cursor = [0] * schedule.n_devices
    free = [0.0] * schedule.n_devices
    spans: list[Span] = []
    live = [0] * schedule.n_devices
    peak = [0] * schedule.n_devices
    remaining = sum(len(a) for a in schedule.actions)

    def arrival(done: Mapping[tuple[int, int], float], stage: int, a: Action) -> float | None:
        end = done.get((stage, a.mb))
        if end is None or schedule.device_of(stage) == schedule.device_of(a.stage):
            return end
        return end + comm_cost

    while remaining:
        progressed = False
        for d, acts in enumerate(schedule.actions):
            while cursor[d] < len(acts):
                a = acts[cursor[d]]
                needs: list[float | None] = []
                if a.kind == "F" and a.stage > 0:
                    needs.append(arrival(forward_done, a.stage - 1, a))
                elif a.kind in ("B", "I"):
                    needs.append(forward_done.get((a.stage, a.mb)))
                    if a.stage < last:
                        needs.append(arrival(grad_done, a.stage + 1, a))
                elif a.kind == "W":
                    needs.append(input_grad_done.get((a.stage, a.mb)))
                ready: list[float] = [t for t in needs if t is not None]
                if len(ready) < len(needs):
                    break
                start = max([free[d], *ready])
                end = start + _duration(durations, a, cost[a.kind])
                key = (a.stage, a.mb)
                if a.kind == "F":
                    forward_done[key] = end
                    live[d] += 1
                else:
                    if a.kind in ("B", "I"):
                        grad_done[key] = end
                    if a.kind == "I":
                        input_grad_done[key] = end
                    else:
                        live[d] -= 1
                peak[d] = max(peak[d], live[d])
                free[d] = end
                spans.append(Span(d, a, start, end))
                cursor[d] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {d: str(acts[cursor[d]]) for d, acts in enumerate(schedule.actions)
                     if cursor[d] < len(acts)}
            raise ValueError(f"schedule deadlocks; devices wait at {stuck}")
    makespan = max(free)
    busy = sum(s.end - s.start for s in spans)
    bubble = 1 - busy / (schedule.n_devices * makespan) if makespan > 0 else 0.0
    return Simulation(makespan, bubble, tuple(peak), tuple(spans))


def _duration(durations: Mapping[tuple[int, str, int], float], a: Action,
              default: float) -> float:
    got = durations.get((a.stage, a.kind, a.mb))
    if got is not None:
        return got
    merged = durations.get((a.stage, "B", a.mb)) if a.kind in ("I", "W") else None
    if merged is None:
        return default
    return merged if a.kind == "I" else 0.0
