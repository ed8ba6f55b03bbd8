"""Rank, world size and head address of this process, from the launcher that started
it. Precedence, field by field: ``SHARDLINE_RANK`` / ``SHARDLINE_WORLD_SIZE`` /
``SHARDLINE_HEAD`` / ``SHARDLINE_LOCAL_RANK``, then the first launcher whose
variables are present: torchrun, Slurm, Open MPI, a Kubernetes StatefulSet (one
module each). ``SHARDLINE_PORT`` sets the head's port unless ``SHARDLINE_HEAD``
carries one.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from . import openmpi, slurm, statefulset, torchrun
from ._found import Found, integer

__all__ = ["DEFAULT_PORT", "Launch", "read_launch"]

DEFAULT_PORT = 29555

LAUNCHERS: tuple[Callable[[Mapping[str, str], str], Found | None], ...] = (
    torchrun.read, slurm.read, openmpi.read, statefulset.read)


@dataclass(frozen=True)
class Launch:
    """Where this process stands in a launched job."""

    rank: int
    world_size: int
    head_host: str
    head_port: int
    local_rank: int | None
    source: str
    """Where the rank came from: ``"SHARDLINE_RANK"``, ``"torchrun"``, ``"Slurm"``, ..."""

    @property
    def head(self) -> str:
        host = f"[{self.head_host}]" if ":" in self.head_host else self.head_host
        return f"tcp://{host}:{self.head_port}"

    def __str__(self) -> str:
        return (f"rank {self.rank} of {self.world_size} (from {self.source}), "
                f"head {self.head}")


def _split_head(text: str) -> tuple[str, int | None]:
    text = text.strip()
    parts = urlsplit(text if "://" in text else f"tcp://{text}")
    if parts.scheme != "tcp" or not parts.hostname:
        raise ValueError(f"SHARDLINE_HEAD={text!r}: expected host, host:port or "
                         "tcp://host:port")
    try:
        return parts.hostname, parts.port
    except ValueError:
        raise ValueError(f"SHARDLINE_HEAD={text!r} has a bad port") from None


def read_launch(environ: Mapping[str, str] | None = None,
                hostname: str | None = None) -> Launch:
    """This process's ``Launch``; ``ValueError`` saying what is missing or malformed."""
    env = os.environ if environ is None else environ
    host_name = hostname if hostname is not None else socket.gethostname()
    found = next((f for f in (read(env, host_name) for read in LAUNCHERS) if f), None)
    launcher = found or Found("nothing")

    rank = integer(env, "SHARDLINE_RANK")
    source = "SHARDLINE_RANK" if rank is not None else launcher.source
    rank = rank if rank is not None else launcher.rank
    world = integer(env, "SHARDLINE_WORLD_SIZE")
    world = world if world is not None else launcher.world_size
    local = integer(env, "SHARDLINE_LOCAL_RANK")
    local = local if local is not None else launcher.local_rank
    head_host, head_port = launcher.head_host, launcher.head_port
    if env.get("SHARDLINE_HEAD", "").strip():
        head_host, head_port = _split_head(env["SHARDLINE_HEAD"])
    elif (port := integer(env, "SHARDLINE_PORT")) is not None:
        head_port = port

    missing = [what for what, value in (("rank", rank), ("world size", world),
                                        ("head address", head_host)) if value is None]
    if missing:
        raise ValueError(
            f"cannot tell this process's {' and '.join(missing)} (launcher: "
            f"{launcher.source}): set SHARDLINE_RANK, SHARDLINE_WORLD_SIZE and "
            "SHARDLINE_HEAD=host:port, or start every rank under torchrun, srun, mpirun "
            "(with -x SHARDLINE_HEAD=host:port across hosts) or in a StatefulSet "
            "(with SHARDLINE_WORLD_SIZE)")
    assert rank is not None and world is not None and head_host is not None
    if world < 1 or rank >= world:
        raise ValueError(f"rank {rank} does not fit a world of size {world} "
                         f"(from {source})")
    if head_port is not None and not 0 < head_port < 65536:
        raise ValueError(f"head port {head_port} is out of range")
    return Launch(rank, world, head_host, head_port or DEFAULT_PORT, local, source)
