"""What a pipeline is made of, as plain data: no processes, no torch.

A ``Plan`` says which layers each virtual stage holds, which (replica, device) runs which
stages where, and where each device's in-memory snapshot is kept. ``Pipeline.start``
executes a plan; recovery after a lost node asks the plan for a new one
(``Plan.replace``) and executes only the devices that moved. Keeping this pure makes the
placement rules testable without a cluster, and printable (``Plan.table``).

Places name a node by its address (``""`` is the driver's own process) plus a device
string, so plans compare and hash as values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from ._errors import PlanError
from .schedules import Schedule

__all__ = ["LOCAL", "DevicePlan", "Place", "Plan", "PlanError", "build_plan"]

LOCAL = ""
"""The node address of a place in the driver's own process."""


@dataclass(frozen=True, order=True)
class Place:
    node: str
    """Address of the node (``LOCAL`` for the driver's process)."""
    device: str = "cpu"

    def __str__(self) -> str:
        return f"{self.node or 'local'}/{self.device}"


@dataclass(frozen=True)
class DevicePlan:
    """One device of one replica of the pipeline."""

    replica: int
    index: int
    """Position in the replica's pipeline (the schedule's device number)."""
    place: Place
    stages: tuple[int, ...]
    """Virtual stages held, ascending."""
    holder: str | None
    """Node keeping this device's snapshot (never its own node); ``None``: no other
    node exists to hold it."""

    @property
    def key(self) -> tuple[int, int]:
        return (self.replica, self.index)


@dataclass(frozen=True)
class Plan:
    schedule: Schedule
    bounds: tuple[tuple[int, int], ...]
    """Layers ``[start, end)`` of each virtual stage."""
    layer_names: tuple[str, ...]
    """The unsharded model's name of each layer (state-dict prefixes)."""
    devices: tuple[tuple[DevicePlan, ...], ...]
    """``devices[replica][index]``."""
    spares: tuple[Place, ...] = ()
    """Places held in reserve for devices whose node is lost."""

    @property
    def replicas(self) -> int:
        return len(self.devices)

    @property
    def n_devices(self) -> int:
        """Devices per replica."""
        return self.schedule.n_devices

    @property
    def n_stages(self) -> int:
        return self.schedule.n_stages

    def all_devices(self) -> list[DevicePlan]:
        return [dev for replica in self.devices for dev in replica]

    def device(self, key: tuple[int, int]) -> DevicePlan:
        return self.devices[key[0]][key[1]]

    def nodes(self) -> set[str]:
        """Every node the plan uses, spares included."""
        return {d.place.node for d in self.all_devices()} | {p.node for p in self.spares}

    def names(self, stage: int) -> list[str]:
        start, end = self.bounds[stage]
        return list(self.layer_names[start:end])

    def on_nodes(self, nodes: set[str]) -> list[DevicePlan]:
        return [d for d in self.all_devices() if d.place.node in nodes]

    def table(self) -> str:
        """One line per device: ``r0 d1 tcp://10.0.0.2:5555/cpu stages [1] layers [4, 8)
        snapshot on tcp://10.0.0.3:5555``."""
        lines = []
        for dev in self.all_devices():
            layers = ", ".join(f"[{self.bounds[s][0]}, {self.bounds[s][1]})"
                               for s in dev.stages)
            where = f"snapshot on {dev.holder or 'local'}" if dev.holder is not None else \
                "no snapshot holder"
            lines.append(f"r{dev.replica} d{dev.index} {dev.place} stages {list(dev.stages)} "
                         f"layers {layers} {where}")
        if self.spares:
            lines.append("spares: " + ", ".join(map(str, self.spares)))
        return "\n".join(lines)

    def replace(self, lost: set[str]) -> Plan:
        """The plan after the nodes ``lost`` went away: each lost node's devices move,
        together, to the first unused spare (keeping their device strings), and every
        device whose snapshot holder was lost gets a new one. Raises ``PlanError`` when
        there are not enough spares."""
        moved: dict[str, Place] = {}
        spares = [p for p in self.spares if p.node not in lost]
        for node in sorted({d.place.node for d in self.on_nodes(lost)}):
            if not spares:
                stages = sorted({s for d in self.on_nodes({node}) for s in d.stages})
                raise PlanError(f"node {node or 'local'} was lost (stages {stages}) and no "
                                "spare node is left to take its place")
            moved[node] = spares.pop(0)
        devices = tuple(tuple(
            replace(d, place=Place(moved[d.place.node].node, d.place.device))
            if d.place.node in moved else d for d in replica) for replica in self.devices)
        return _with_holders(replace(self, devices=devices, spares=tuple(spares)),
                             keep={d.key: d.holder for d in self.all_devices()
                                   if d.holder is not None and d.holder not in lost
                                   and d.place.node not in lost})

    def moved(self, other: Plan) -> list[DevicePlan]:
        """Devices of ``other`` placed differently than in this plan."""
        return [d for d in other.all_devices() if self.device(d.key).place != d.place]


def build_plan(schedule: Schedule, bounds: Sequence[tuple[int, int]],
               layer_names: Sequence[str], placement: Sequence[Sequence[Place]],
               spares: Sequence[Place] = ()) -> Plan:
    """``placement[replica][device]`` -> the plan: device ``d`` of each replica holds the
    schedule's stages of ``d``, and keeps its snapshot on another node."""
    if len(bounds) != schedule.n_stages:
        raise PlanError(f"{len(bounds)} layer ranges for {schedule.n_stages} stages")
    if not placement:
        raise PlanError("a plan needs at least one replica")
    for r, places in enumerate(placement):
        if len(places) != schedule.n_devices:
            raise PlanError(f"replica {r} has {len(places)} places for "
                            f"{schedule.n_devices} devices")
    used = {p.node for places in placement for p in places}
    for spare in spares:
        if spare.node == LOCAL or spare.node in used:
            raise PlanError(f"spare {spare} is not a node of its own: a spare must be a "
                            "remote node that holds no stage")
    held = [tuple(s for s in range(schedule.n_stages) if schedule.device_of(s) == d)
            for d in range(schedule.n_devices)]
    devices = tuple(tuple(DevicePlan(r, d, place, held[d], None)
                          for d, place in enumerate(places))
                    for r, places in enumerate(placement))
    plan = Plan(schedule, tuple(bounds), tuple(layer_names), devices, tuple(spares))
    return _with_holders(plan, keep={})


def _with_holders(plan: Plan, keep: dict[tuple[int, int], str]) -> Plan:
    """Give each device a snapshot holder on another node: the next node in a ring of
    the plan's distinct stage nodes (each node then holds about one device's worth of
    someone else's state, as Gemini spreads its checkpoints), falling back to a spare.
    ``keep`` are assignments that still stand."""
    ring: list[str] = []
    for dev in plan.all_devices():
        if dev.place.node not in ring:
            ring.append(dev.place.node)
    spare_nodes = [p.node for p in plan.spares]

    def holder(node: str) -> str | None:
        if len(ring) > 1:
            return ring[(ring.index(node) + 1) % len(ring)]
        return spare_nodes[0] if spare_nodes else None

    devices = tuple(tuple(replace(d, holder=keep.get(d.key, holder(d.place.node)))
                          for d in replica) for replica in plan.devices)
    return replace(plan, devices=devices)
