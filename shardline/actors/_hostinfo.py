"""What a node says about itself in its hello: host, pid, rank, local rank, devices.

Devices are found without importing torch (a worker must start in well under a
second), the way CUDA counts them: ``CUDA_VISIBLE_DEVICES`` when set, else the GPUs
the NVIDIA driver lists in ``/proc/driver/nvidia/gpus``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Any

from ..transport import Peer

__all__ = ["describe", "devices", "gpu_count", "local_rank_from_env", "parse_info", "peer_info"]

# Local rank, in order: shardline's own, torchrun, Slurm, Open MPI, MPICH / Intel MPI.
LOCAL_RANK_VARS = ("SHARDLINE_LOCAL_RANK", "LOCAL_RANK", "SLURM_LOCALID",
                   "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID")


def local_rank_from_env(environ: Mapping[str, str]) -> int | None:
    """This process's rank among the ranks on its host, from the launcher's variables."""
    for var in LOCAL_RANK_VARS:
        value = environ.get(var, "").strip()
        if value:
            try:
                rank = int(value)
            except ValueError:
                raise ValueError(f"{var}={value!r} is not an integer") from None
            if rank < 0:
                raise ValueError(f"{var}={value!r} is negative")
            return rank
    return None


def gpu_count(environ: Mapping[str, str]) -> int:
    """How many CUDA devices this process may use."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        # CUDA's rule: the list ends at the first entry that names no device.
        count = 0
        for entry in visible.split(","):
            entry = entry.strip()
            if not entry or entry.startswith("-") or not (
                    entry.isdigit() or entry.startswith(("GPU-", "MIG-"))):
                break
            count += 1
        return count
    try:
        return len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return 0


def devices(local_rank: int | None, environ: Mapping[str, str]) -> list[str]:
    """``["cpu", "cuda:0", ...]``: the devices this process should use.

    A process started by a launcher (it has a local rank) on a host with several GPUs
    gets one, ``cuda:{local_rank mod count}``, as torchrun's convention has it; a
    process without a local rank lists every GPU it can see.
    """
    count = gpu_count(environ)
    if count == 0:
        return ["cpu"]
    if local_rank is not None:
        return ["cpu", f"cuda:{local_rank % count}"]
    return ["cpu", *(f"cuda:{i}" for i in range(count))]


def describe(*, rank: int | None = None, local_rank: int | None = None,
             environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """This process, as its hello and join messages describe it (msgpack-able)."""
    env = os.environ if environ is None else environ
    return {"host": socket.gethostname(), "pid": os.getpid(), "rank": rank,
            "local_rank": local_rank, "devices": devices(local_rank, env)}


def parse_info(raw: Any) -> dict[str, Any]:
    """A peer's self-description, with every field checked: what is malformed or
    missing becomes ``None`` (``["cpu"]`` for devices), never an exception."""
    info = raw if isinstance(raw, dict) else {}

    def whole(key: str) -> int | None:
        value = info.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) and (
            value >= 0) else None

    host = info.get("host")
    found = info.get("devices")
    listed = ([d for d in found if isinstance(d, str) and len(d) <= 64][:256]
              if isinstance(found, list) else [])
    return {"host": host if isinstance(host, str) and len(host) <= 255 else None,
            "pid": whole("pid"), "rank": whole("rank"), "local_rank": whole("local_rank"),
            "devices": listed or ["cpu"]}


def peer_info(peer: Peer) -> dict[str, Any]:
    """The self-description the node sent in its hello answer."""
    return parse_info(getattr(peer, "info", None))
