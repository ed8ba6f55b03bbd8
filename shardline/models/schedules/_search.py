"""A schedule found for measured costs and a memory limit, after the heuristic of the
zero-bubble paper (Qi et al., ICLR 2024, section 3): ``I`` first (it is on the critical
path), ``F`` while the warm-up and the memory allow, ``W`` into the gaps, several
settings tried and the best kept."""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Mapping, Sequence

from ._action import Action
from ._one_f_one_b import one_f_one_b
from ._schedule import Schedule, check_sizes
from ._simulate import simulate
from ._zero_bubble import zb_h1

__all__ = ["search"]

Costs = Sequence[Mapping[str, float]]
"""Per stage: the cost of its ``F``, ``I`` and ``W``."""


def search(devices: int, microbatches: int,
           durations: Mapping[str, float] | Mapping[tuple[int, str, int], float],
           max_activations: int | None = None, *, comm_cost: float = 0.0) -> Schedule:
    """The fastest schedule found for one stage per device, given what ``F``, ``I`` and
    ``W`` cost and at most ``max_activations`` microbatches held per device at once
    (counted as ``simulate`` counts ``peak_activations``; default ``devices``, 1F1B's
    peak).

    ``durations`` is either ``{"F": f, "I": i, "W": w}`` (every stage alike) or what
    ``StepTrace.durations()`` returns for a step run with split backwards, keyed
    ``(stage, kind, mb)`` (averaged per stage and kind, so uneven stages are taken into
    account).

    Candidates: 1F1B and ZB-H1 where they fit the memory, and a greedy list scheduler
    played in simulated time for a range of warm-up depths, with ``W`` either filling
    every idle moment or only gaps at least as long as a ``W`` (and whenever the memory
    is full). Each is simulated with the costs given; the one with the smallest makespan
    wins, the earliest in that order on a tie, so the result is never slower than 1F1B
    when 1F1B fits. The greedy schedules are named ``"search"``.
    """
    p, m = devices, microbatches
    check_sizes(p, m)
    limit = p if max_activations is None else max_activations
    if limit < 1:
        raise ValueError(f"max_activations must be >= 1, got {limit}")
    if comm_cost < 0:
        raise ValueError(f"comm_cost must be >= 0, got {comm_cost}")
    costs = _per_stage(p, durations)
    per_action = {(s, k, mb): c[k] for s, c in enumerate(costs) for k in "FIW"
                  for mb in range(m)}
    per_action.update({(s, "B", mb): c["I"] + c["W"] for s, c in enumerate(costs)
                       for mb in range(m)})
    candidates = [one_f_one_b(p, m), zb_h1(p, m)]
    for extra in range(p + 1):
        ahead = [min(limit, p - s + extra) for s in range(p)]
        for eager in (False, True):
            candidates.append(_greedy(p, m, costs, limit, ahead, eager, comm_cost))
    best: tuple[float, Schedule] | None = None
    for schedule in candidates:
        sim = simulate(schedule, comm_cost=comm_cost, durations=per_action)
        if max(sim.peak_activations) > limit:
            continue
        if best is None or sim.makespan < best[0] - 1e-12:
            best = (sim.makespan, schedule)
    assert best is not None  # the greedy candidates always respect the limit
    return best[1]


def _per_stage(p: int, durations: Mapping[str, float] | Mapping[tuple[int, str, int], float],
               ) -> list[dict[str, float]]:
    if all(isinstance(k, str) for k in durations):
        flat: dict[str, float] = {str(k): float(v) for k, v in durations.items()}
        missing = {"F", "I", "W"} - set(flat)
        if missing:
            raise ValueError(f"durations needs F, I and W, missing {' '.join(sorted(missing))}")
        if min(flat[k] for k in "FIW") < 0:
            raise ValueError("durations must be >= 0")
        return [{k: flat[k] for k in "FIW"} for _ in range(p)]
    sums: dict[tuple[int, str], list[float]] = {}
    for key, value in durations.items():
        if not (isinstance(key, tuple) and len(key) == 3):
            raise ValueError(f"durations key {key!r}: expected 'F' / 'I' / 'W' or "
                             "(stage, kind, mb)")
        stage, kind, _ = key
        if not 0 <= stage < p:
            raise ValueError(f"durations name stage {stage}, outside 0..{p - 1}")
        sums.setdefault((stage, kind), []).append(float(value))
    costs = []
    for s in range(p):
        absent = [k for k in "FIW" if (s, k) not in sums]
        if absent:
            raise ValueError(f"no {' '.join(absent)} durations for stage {s}: measure a "
                             "step of a schedule that splits the backward (e.g. 'zb-h1')")
        costs.append({k: sum(sums[s, k]) / len(sums[s, k]) for k in "FIW"})
    return costs


def _greedy(p: int, m: int, costs: Costs, limit: int, ahead: Sequence[int], eager: bool,
            comm: float) -> Schedule:
    """List scheduling in simulated time: whenever a device is free it runs, in this
    order of preference, the ``I`` of the oldest microbatch whose gradient is there; the
    next ``F`` if its input is there, fewer than ``ahead[d]`` forwards await their ``I``
    and fewer than ``limit`` microbatches are held; a pending ``W`` if ``eager``, if
    nothing will arrive within a ``W``'s time, or if the memory is full. Otherwise it
    waits for the next arrival."""
    last = p - 1
    forward_out: dict[tuple[int, int], float] = {}  # (stage, mb) -> when its F ended
    grad_out: dict[tuple[int, int], float] = {}  # (stage, mb) -> when its I ended
    next_f = [0] * p
    awaiting_i: list[list[int]] = [[] for _ in range(p)]  # forwarded, I not yet run
    pending_w: list[deque[int]] = [deque() for _ in range(p)]
    held = [0] * p
    programs: list[list[Action]] = [[] for _ in range(p)]
    # (when to look at the device again, tie-break, device, version): an entry whose
    # version is not the device's current one was superseded
    queue = [(0.0, d, d, 0) for d in range(p)]
    version = [0] * p
    waiting: dict[int, float] = {}  # idle device -> when it looks again (inf: unknown)
    seq = p
    remaining = 3 * p * m

    def look_again(d: int, when: float) -> None:
        nonlocal seq
        seq += 1
        version[d] += 1
        heapq.heappush(queue, (when, seq, d, version[d]))

    def arrival(done: dict[tuple[int, int], float], stage: int, mb: int, d: int) -> float | None:
        end = done.get((stage, mb))
        return None if end is None else end + (comm if stage != d else 0.0)

    def input_at(d: int, mb: int) -> float | None:
        return 0.0 if d == 0 else arrival(forward_out, d - 1, mb, d)

    def grad_at(d: int, mb: int) -> float | None:
        return forward_out.get((d, mb)) if d == last else arrival(grad_out, d + 1, mb, d)

    while remaining:
        if not queue:
            raise AssertionError(f"greedy search stalled with devices {sorted(waiting)} idle")
        t, _, d, v = heapq.heappop(queue)
        if v != version[d]:
            continue
        c = costs[d]
        ready_i = [mb for mb in awaiting_i[d] if (g := grad_at(d, mb)) is not None and g <= t]
        can_f = (next_f[d] < m and len(awaiting_i[d]) < ahead[d] and held[d] < limit)
        f_at = input_at(d, next_f[d]) if can_f else None
        action: Action | None = None
        if ready_i:
            mb = min(ready_i)
            awaiting_i[d].remove(mb)
            pending_w[d].append(mb)
            grad_out[d, mb] = t + c["I"]
            action = Action(d, "I", mb)
        elif f_at is not None and f_at <= t:
            mb = next_f[d]
            next_f[d] += 1
            awaiting_i[d].append(mb)
            held[d] += 1
            forward_out[d, mb] = t + c["F"]
            action = Action(d, "F", mb)
        else:
            soon = [a for a in [f_at, *(grad_at(d, mb) for mb in awaiting_i[d])]
                    if a is not None and a > t]
            full = held[d] >= limit and next_f[d] < m
            if pending_w[d] and (eager or full or not soon or min(soon) - t >= c["W"]):
                mb = pending_w[d].popleft()
                held[d] -= 1
                action = Action(d, "W", mb)
            else:
                # idle until what we wait for arrives, or until another device's next
                # action ends (it may be what we wait for; see below)
                waiting[d] = min(soon, default=float("inf"))
                if soon:
                    look_again(d, waiting[d])
                continue
        waiting.pop(d, None)
        programs[d].append(action)
        remaining -= 1
        end = t + c[action.kind]
        if next_f[d] < m or awaiting_i[d] or pending_w[d]:
            look_again(d, end)
        for idle, when in list(waiting.items()):
            if end < when:
                waiting[idle] = end
                look_again(idle, end)
    return Schedule("search", p, p, m, tuple(tuple(a) for a in programs))
