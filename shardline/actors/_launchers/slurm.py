"""Slurm (``srun``): ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``; the head is
the first host of ``SLURM_STEP_NODELIST`` (or ``SLURM_JOB_NODELIST``).

Slurm reserves no port for the job, so the port is derived from the job id
(``20000 + job id mod 10000``): two jobs sharing a host rarely pick the same one.
``SHARDLINE_PORT`` overrides it.
"""

from __future__ import annotations

from collections.abc import Mapping

from . import hostlist
from ._found import Found, integer

__all__ = ["read"]


def read(environ: Mapping[str, str], hostname: str) -> Found | None:
    rank, world = integer(environ, "SLURM_PROCID"), integer(environ, "SLURM_NTASKS")
    if rank is None or world is None:
        return None
    nodes = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or ""
    head = hostlist.first_host(nodes) if nodes else None
    job = integer(environ, "SLURM_JOB_ID")
    port = None if job is None else 20000 + job % 10000
    return Found("Slurm", rank, world, head, port, integer(environ, "SLURM_LOCALID"))
