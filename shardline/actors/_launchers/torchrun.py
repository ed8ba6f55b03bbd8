"""torchrun (and torch.distributed.launch): ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``.

torchrun's agent on the head host already listens on ``MASTER_PORT`` (its c10d store),
so the head's shardline port is the next one, ``MASTER_PORT + 1``.
"""

from __future__ import annotations

from collections.abc import Mapping

from ._found import Found, integer

__all__ = ["read"]


def read(environ: Mapping[str, str], hostname: str) -> Found | None:
    rank, world = integer(environ, "RANK"), integer(environ, "WORLD_SIZE")
    if rank is None or world is None:
        return None
    port = integer(environ, "MASTER_PORT")
    return Found("torchrun", rank, world, environ.get("MASTER_ADDR") or None,
                 None if port is None else port + 1, integer(environ, "LOCAL_RANK"))
