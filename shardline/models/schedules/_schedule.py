"""A schedule: every device's ordered program, and where each stage lives."""

from __future__ import annotations

from dataclasses import dataclass, field

from ._action import Action

__all__ = ["Schedule", "check_sizes", "v_placement"]

_COMPLETE = (("F", "B"), ("F", "I", "W"))


@dataclass(frozen=True)
class Schedule:
    """``actions[d]`` is the ordered program of device ``d``; ``stage_to_device[s]`` is
    the device that holds (virtual) stage ``s``.

    ``stage_to_device`` defaults to ``s % n_devices``: stage ``s`` on device ``s`` with one
    stage per device, Megatron-LM's round-robin layout with several. V-shaped schedules
    (``zbv``, ``dualpipe_v``) pass their own map.
    """

    name: str
    n_devices: int
    n_stages: int
    n_microbatches: int
    actions: tuple[tuple[Action, ...], ...]
    stage_to_device: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.stage_to_device:
            object.__setattr__(self, "stage_to_device",
                               tuple(s % self.n_devices for s in range(self.n_stages)))
        if len(self.stage_to_device) != self.n_stages:
            raise ValueError(f"stage_to_device has {len(self.stage_to_device)} entries for "
                             f"{self.n_stages} stages")
        if any(not 0 <= d < self.n_devices for d in self.stage_to_device):
            raise ValueError(f"stage_to_device {self.stage_to_device} names a device outside "
                             f"0..{self.n_devices - 1}")
        if len(self.actions) != self.n_devices:
            raise ValueError(f"{len(self.actions)} programs for {self.n_devices} devices")

    @property
    def chunks(self) -> int:
        """Stages per device (every device holds the same number)."""
        return self.n_stages // self.n_devices

    @property
    def splits_backward(self) -> bool:
        """Whether any backward is split into ``I`` and ``W``."""
        return any(a.kind == "I" for acts in self.actions for a in acts)

    def device_of(self, stage: int) -> int:
        return self.stage_to_device[stage]

    def stages_of(self, device: int) -> tuple[int, ...]:
        """The stages ``device`` holds, in stage order."""
        return tuple(s for s, d in enumerate(self.stage_to_device) if d == device)

    def table(self) -> str:
        """One row per device, e.g. ``dev0: 0F0 0F1 0B0 ...``."""
        return "\n".join(f"dev{d}: " + " ".join(map(str, acts))
                         for d, acts in enumerate(self.actions))

    def __str__(self) -> str:
        return f"{self.name} (p={self.n_devices}, m={self.n_microbatches})\n{self.table()}"

    def validate(self) -> None:
        """Every (stage, microbatch) has one ``F`` then one ``B``, or one ``F``, one ``I``
        then one ``W``, all on the stage's own device, and nothing else is scheduled.
        Raises ``ValueError`` naming the first offence. (Whether the programs can run
        without deadlock is for ``simulate`` to say.)"""
        seen: dict[tuple[int, int], list[str]] = {}
        for d, acts in enumerate(self.actions):
            for a in acts:
                if not (0 <= a.stage < self.n_stages and 0 <= a.mb < self.n_microbatches):
                    raise ValueError(f"{a} on device {d} is outside {self.n_stages} stages x "
                                     f"{self.n_microbatches} microbatches")
                if self.device_of(a.stage) != d:
                    raise ValueError(f"{a} is on device {d}, stage {a.stage} lives on "
                                     f"{self.device_of(a.stage)}")
                seen.setdefault((a.stage, a.mb), []).append(a.kind)
        for s in range(self.n_stages):
            for mb in range(self.n_microbatches):
                got = tuple(seen.get((s, mb), ()))
                if got not in _COMPLETE:
                    raise ValueError(f"stage {s} microbatch {mb}: expected F then B, or F, "
                                     f"I then W, got {' '.join(got) or 'nothing'}")


def check_sizes(devices: int, microbatches: int) -> None:
    if devices < 1 or microbatches < 1:
        raise ValueError(f"need at least one device and one microbatch, got "
                         f"p={devices}, m={microbatches}")


def v_placement(devices: int) -> tuple[int, ...]:
    """The V-shaped stage-to-device map of ``2 * devices`` stages: device ``d`` holds
    stages ``d`` and ``2 * devices - 1 - d``, so the model goes down the devices and back
    up, and the last device holds the two middle stages (no hop between them)."""
    return tuple(s if s < devices else 2 * devices - 1 - s for s in range(2 * devices))
