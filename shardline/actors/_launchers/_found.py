"""What one launcher's variables say about this process."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["Found", "integer"]


@dataclass(frozen=True)
class Found:
    source: str
    """Who said so, for messages: ``"torchrun"``, ``"Slurm"``, ..."""
    rank: int | None = None
    world_size: int | None = None
    head_host: str | None = None
    head_port: int | None = None
    local_rank: int | None = None


def integer(environ: Mapping[str, str], var: str) -> int | None:
    """``environ[var]`` as an int >= 0; ``None`` if unset; ``ValueError`` if malformed."""
    value = environ.get(var, "").strip()
    if not value:
        return None
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{var}={value!r} is not an integer") from None
    if number < 0:
        raise ValueError(f"{var}={value!r} is negative")
    return number
