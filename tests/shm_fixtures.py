"""Actors and probes for the shared-memory tests (imported by worker processes too)."""

from __future__ import annotations

import gc
import os
from typing import Any

import torch

import shardline as sl


def memfd_mappings(pid: int | None = None) -> list[tuple[int, int]]:
    """``(start, end)`` of every mapping of a shardline memfd in process ``pid``."""
    found = []
    with open(f"/proc/{pid or os.getpid()}/maps") as f:
        for line in f:
            if "/memfd:shardline" in line:
                start, end = line.split()[0].split("-")
                found.append((int(start, 16), int(end, 16)))
    return found


def memfd_descriptors(pid: int | None = None) -> int:
    """How many open file descriptors of process ``pid`` are shardline memfds."""
    root = f"/proc/{pid or os.getpid()}/fd"
    n = 0
    for name in os.listdir(root):
        try:
            if os.readlink(f"{root}/{name}").startswith("/memfd:shardline"):
                n += 1
        except OSError:
            continue
    return n


def in_segment(t: torch.Tensor) -> bool:
    """Whether ``t``'s memory lies in a mapping of a shardline segment."""
    ptr = t.data_ptr()
    return any(start <= ptr < end for start, end in memfd_mappings())


class Holder(sl.Actor):
    """Keeps what it is sent until told to drop it."""

    def __init__(self) -> None:
        self.held: list[torch.Tensor] = []

    def keep(self, t: torch.Tensor) -> dict[str, Any]:
        self.held.append(t)
        return {"sum": float(t.double().sum()), "in_segment": in_segment(t),
                "pid": os.getpid()}

    def check(self, t: torch.Tensor) -> dict[str, Any]:
        return {"sum": float(t.double().sum()), "in_segment": in_segment(t)}

    def drop(self) -> int:
        self.held.clear()
        gc.collect()
        return len(memfd_mappings())

    def poke(self, t: torch.Tensor, value: float) -> None:
        t[0] = value

    def arange(self, n: int) -> torch.Tensor:
        return torch.arange(n, dtype=torch.float32)

    def echo(self, value: Any) -> Any:
        return value

    def on_gpu(self, t: torch.Tensor) -> dict[str, Any]:
        return {"device": str(t.device), "sum": float(t.double().sum())}

    def gpu_arange(self, n: int) -> torch.Tensor:
        return torch.arange(n, dtype=torch.float32, device="cuda:0")

    def mappings(self) -> int:
        gc.collect()
        return len(memfd_mappings())


class Probe(sl.Actor):
    """What this process's shared-memory exchange holds."""

    def statistics(self) -> dict[str, int]:
        from shardline.transport._exchange import exchange

        return exchange().statistics()
