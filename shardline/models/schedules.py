"""Pipeline schedules as data: per-device lists of actions, and a simulator.

Pure functions, no torch and no network: a schedule can be printed, tested against
the papers and drawn before anything runs. The scheduler executes whatever list it is
given. Stages are *virtual* stages: with ``interleaved_1f1b(p, m, chunks=v)`` device
``d`` holds stages ``d, d + p, ..., d + (v - 1) p`` (Megatron-LM's layout); for the
other schedules stage ``s`` is device ``s``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "Action",
    "Schedule",
    "Simulation",
    "by_name",
    "gpipe",
    "interleaved_1f1b",
    "one_f_one_b",
    "simulate",
]

Kind = Literal["F", "B"]
_ACTION = re.compile(r"^(\d+)([FB])(\d+)$")


@dataclass(frozen=True, order=True)
class Action:
    """Run a forward ``F`` or backward ``B`` of microbatch ``mb`` on (virtual) ``stage``."""

    stage: int
    kind: Kind
    mb: int

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.mb}"

    @classmethod
    def from_str(cls, text: str) -> Action:
        """Parse the compact form ``"2F0"`` (stage 2, forward, microbatch 0)."""
        match = _ACTION.match(text.strip())
        if match is None:
            raise ValueError(f"not an action: {text!r} (expected e.g. '2F0')")
        stage, kind, mb = match.groups()
        return cls(int(stage), kind, int(mb))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Schedule:
    """``actions[d]`` is the ordered program of device ``d``."""

    name: str
    n_devices: int
    n_stages: int
    n_microbatches: int
    actions: tuple[tuple[Action, ...], ...]

    @property
    def chunks(self) -> int:
        return self.n_stages // self.n_devices

    def device_of(self, stage: int) -> int:
        return stage % self.n_devices

    def table(self) -> str:
        """One row per device, e.g. ``dev0: 0F0 0F1 0B0 ...``."""
        return "\n".join(f"dev{d}: " + " ".join(map(str, acts))
                         for d, acts in enumerate(self.actions))

    def __str__(self) -> str:
        return f"{self.name} (p={self.n_devices}, m={self.n_microbatches})\n{self.table()}"

    def validate(self) -> None:
        """Every (stage, mb) has one F then one B on the stage's own device."""
        seen: dict[tuple[int, int], list[str]] = {}
        for d, acts in enumerate(self.actions):
            for a in acts:
                if self.device_of(a.stage) != d:
                    raise ValueError(f"{a} is on device {d}, stage {a.stage} lives on "
                                     f"{self.device_of(a.stage)}")
                seen.setdefault((a.stage, a.mb), []).append(a.kind)
        for s in range(self.n_stages):
            for mb in range(self.n_microbatches):
                if seen.get((s, mb)) != ["F", "B"]:
                    raise ValueError(f"stage {s} microbatch {mb}: expected F then B, got "
                                     f"{seen.get((s, mb))}")


def _check(p: int, m: int) -> None:
    if p < 1 or m < 1:
        raise ValueError(f"need at least one stage and one microbatch, got p={p}, m={m}")


def gpipe(stages: int, microbatches: int) -> Schedule:
    """GPipe: all forwards, then all backwards (backwards in reverse microbatch order)."""
    _check(stages, microbatches)
    acts = tuple(
        tuple(Action(s, "F", mb) for mb in range(microbatches))
        + tuple(Action(s, "B", mb) for mb in reversed(range(microbatches)))
        for s in range(stages))
    return Schedule("gpipe", stages, stages, microbatches, acts)


def one_f_one_b(stages: int, microbatches: int) -> Schedule:
    """1F1B (PipeDream-Flush): stage ``s`` warms up with ``p - s - 1`` forwards, then
    alternates one forward and one backward, so it never holds more than ``p - s``
    microbatches' activations."""
    _check(stages, microbatches)
    programs = []
    for s in range(stages):
        warmup = min(stages - s - 1, microbatches)
        acts = [Action(s, "F", mb) for mb in range(warmup)]
        f, b = warmup, 0
        while f < microbatches:
            acts.append(Action(s, "F", f))
            acts.append(Action(s, "B", b))
            f += 1
            b += 1
        acts.extend(Action(s, "B", mb) for mb in range(b, microbatches))
        programs.append(tuple(acts))
    return Schedule("1f1b", stages, stages, microbatches, tuple(programs))


def interleaved_1f1b(stages: int, microbatches: int, chunks: int = 2) -> Schedule:
    """Interleaved 1F1B (Megatron-LM): each of ``stages`` devices holds ``chunks`` model
    chunks; microbatches go round in groups of ``stages``. Needs
    ``microbatches % stages == 0``. With equal costs its bubble is ``chunks`` times
    smaller than 1F1B's."""
    p, m, v = stages, microbatches, chunks
    _check(p, m)
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
        f, b = warmup, 0
        while f < total:
            acts.append(forward(d, f))
            acts.append(backward(d, b))
            f += 1
            b += 1
        acts.extend(backward(d, k) for k in range(b, total))
        programs.append(tuple(acts))
    return Schedule("interleaved-1f1b", p, p * v, m, tuple(programs))


def by_name(name: str, stages: int, microbatches: int, chunks: int = 2) -> Schedule:
    """``"gpipe"`` | ``"1f1b"`` | ``"interleaved-1f1b"`` -> the schedule."""
    key = name.lower().replace("_", "-")
    if key == "gpipe":
        return gpipe(stages, microbatches)
    if key in ("1f1b", "one-f-one-b"):
        return one_f_one_b(stages, microbatches)
    if key in ("interleaved-1f1b", "interleaved"):
        return interleaved_1f1b(stages, microbatches, chunks)
    raise ValueError(f"unknown schedule {name!r}: use 'gpipe', '1f1b' or 'interleaved-1f1b'")


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
    """Per device: most microbatch-chunks whose forward ran and backward has not."""
    spans: tuple[Span, ...] = field(repr=False)

    @property
    def ideal(self) -> float:
        """Makespan with no bubble: one device's total work."""
        return self.makespan * (1 - self.bubble_fraction)


def simulate(schedule: Schedule, forward_cost: float = 1.0,
             backward_cost: float = 2.0, comm_cost: float = 0.0, *,
             durations: Mapping[tuple[int, str, int], float] | None = None) -> Simulation:
    """Play the schedule with fixed costs per full-stage forward/backward (a chunk of an
    interleaved schedule costs ``1/chunks`` of that) and ``comm_cost`` per hop.

    ``durations`` overrides the cost of single actions, keyed ``(stage, kind, mb)``:
    given the durations a real step measured (``Trace.durations``), the makespan is what
    that step would have taken with no scheduling or communication overhead at all.
    """
    schedule.validate()
    durations = durations or {}
    v = schedule.chunks
    cost = {"F": forward_cost / v, "B": backward_cost / v}
    last = schedule.n_stages - 1
    done: dict[tuple[int, str, int], float] = {}
    cursor = [0] * schedule.n_devices
    free = [0.0] * schedule.n_devices
    spans: list[Span] = []
    live = [0] * schedule.n_devices
    peak = [0] * schedule.n_devices
    remaining = sum(len(a) for a in schedule.actions)
    while remaining:
        progressed = False
        for d, acts in enumerate(schedule.actions):
            while cursor[d] < len(acts):
                a = acts[cursor[d]]
                deps = []
                if a.kind == "F" and a.stage > 0:
                    deps.append((a.stage - 1, "F", a.mb))
                if a.kind == "B":
                    deps.append((a.stage, "F", a.mb))
                    if a.stage < last:
                        deps.append((a.stage + 1, "B", a.mb))
                if any(dep not in done for dep in deps):
                    break
                ready = max([free[d]] + [done[dep] + (comm_cost if dep[0] != a.stage else 0.0)
                                         for dep in deps])
                end = ready + durations.get((a.stage, a.kind, a.mb), cost[a.kind])
                done[(a.stage, a.kind, a.mb)] = end
                free[d] = end
                spans.append(Span(d, a, ready, end))
                live[d] += 1 if a.kind == "F" else -1
                peak[d] = max(peak[d], live[d])
                cursor[d] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {d: str(acts[cursor[d]]) for d, acts in enumerate(schedule.actions)
                     if cursor[d] < len(acts)}
            raise ValueError(f"schedule deadlocks; devices wait at {stuck}")
    makespan = max(free)
    busy = sum(s.end - s.start for s in spans)
    bubble = 1 - busy / (schedule.n_devices * makespan)
    return Simulation(makespan, bubble, tuple(peak), tuple(spans))
