"""Open MPI (``mpirun``): ``OMPI_COMM_WORLD_RANK``, ``OMPI_COMM_WORLD_SIZE``,
``OMPI_COMM_WORLD_LOCAL_RANK``.

Open MPI does not say where rank 0 runs. When every rank is on this host
(``OMPI_COMM_WORLD_LOCAL_SIZE`` equals the world size) the head is 127.0.0.1;
otherwise pass it: ``mpirun -x SHARDLINE_HEAD=host:port``.
"""

from __future__ import annotations

from collections.abc import Mapping

from ._found import Found, integer

__all__ = ["read"]


def read(environ: Mapping[str, str], hostname: str) -> Found | None:
    rank = integer(environ, "OMPI_COMM_WORLD_RANK")
    world = integer(environ, "OMPI_COMM_WORLD_SIZE")
    if rank is None or world is None:
        return None
    local_size = integer(environ, "OMPI_COMM_WORLD_LOCAL_SIZE")
    head = "127.0.0.1" if local_size is not None and local_size == world else None
    return Found("Open MPI", rank, world, head, None,
                 integer(environ, "OMPI_COMM_WORLD_LOCAL_RANK"))
