"""Where a message's buffers go: frames of the ZeroMQ message, or shared memory when the
peer is a process on this host (``_exchange``). The codec's encoders ask here, so
nothing above the transport knows which way a buffer went."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._exchange import Link

__all__ = ["SHM_MIN_BYTES", "Buffers", "Frames", "default_shm_min_bytes", "discard",
           "message_size", "shm_keep", "shm_link", "shm_reserve", "shm_share", "shm_wanted"]

# Buffers from this size on go through shared memory to a peer on the same host.
SHM_MIN_BYTES = 1 << 20


def default_shm_min_bytes() -> int | None:
    """``SHARDLINE_SHM_MIN_BYTES``: the smallest buffer sent through shared memory
    (default 1 MiB; ``off`` never uses it)."""
    value = os.environ.get("SHARDLINE_SHM_MIN_BYTES", "").strip().lower()
    if not value:
        return SHM_MIN_BYTES
    if value in ("off", "none", "no", "false"):
        return None
    try:
        return max(1, int(value))
    except ValueError:
        raise ValueError(f"SHARDLINE_SHM_MIN_BYTES must be a number of bytes or 'off', "
                         f"got {value!r}") from None


class Buffers(list[Any]):
    """The buffers of the message being encoded, and where large ones may go instead
    (``link``: shared memory toward the peer, when it is on this host)."""

    __slots__ = ("link", "min_bytes", "placed", "shm_bytes")

    def __init__(self, link: Link | None, min_bytes: int) -> None:
        super().__init__()
        self.link = link
        self.min_bytes = min_bytes
        self.placed: list[tuple[Link, int]] = []
        self.shm_bytes = 0


class Frames(list[Any]):
    """``[header, *buffer frames]`` of a message that also lends shared memory:
    ``placed`` names what it lends, ``shm_bytes`` how much. A message that is never
    sent must be ``discard``ed, or what it lends stays lent."""

    __slots__ = ("placed", "shm_bytes")
    placed: list[tuple[Link, int]]
    shm_bytes: int


def shm_link(buffers: list[Any]) -> Link | None:
    """For an encoder: the shared-memory link to the peer (None: not on this host)."""
    return buffers.link if type(buffers) is Buffers else None


def shm_wanted(buffers: list[Any], nbytes: int) -> bool:
    """For an encoder: whether an ``nbytes`` buffer should go through shared memory
    (the peer is a process on this host and the buffer is large)."""
    return type(buffers) is Buffers and buffers.link is not None and \
        nbytes >= buffers.min_bytes


def shm_reserve(buffers: list[Any], nbytes: int) -> tuple[Any, list[int]] | None:
    """For an encoder: a writable buffer in shared memory to copy ``nbytes`` into, and
    the descriptor to put in the payload instead of a frame index; None when it should
    not or cannot go there (append a frame as usual)."""
    if not shm_wanted(buffers, nbytes):
        return None
    assert type(buffers) is Buffers and buffers.link is not None
    from ._exchange import exchange

    got = exchange().reserve(buffers.link, nbytes)
    if got is not None:
        buffers.placed.append((buffers.link, got[1][1]))
        buffers.shm_bytes += nbytes
    return got


def shm_share(buffers: list[Any], address: int, nbytes: int) -> list[int] | None:
    """For an encoder: the descriptor of memory that already lies in a shared segment
    of this process (``shared_empty``), lent without a copy; None otherwise."""
    if not shm_wanted(buffers, nbytes):
        return None
    assert type(buffers) is Buffers and buffers.link is not None
    from ._exchange import exchange

    where = exchange().share(buffers.link, address, nbytes)
    if where is not None:
        buffers.placed.append((buffers.link, where[1]))
        buffers.shm_bytes += nbytes
    return where


def shm_keep(buffers: list[Any], obj: Any) -> list[int] | None:
    """For an encoder: ``[proc, token]`` once ``obj`` is held until the peer (a process
    on this host) releases the token; None when the peer is elsewhere."""
    if type(buffers) is not Buffers or buffers.link is None:
        return None
    from ._exchange import exchange

    ex = exchange()
    token = ex.keep(buffers.link, obj)
    buffers.placed.append((buffers.link, token))
    return [ex.proc, token]


def discard(frames: list[Any]) -> None:
    """``frames`` will never be sent: what they lend is free again."""
    if type(frames) is Frames and frames.placed:
        from ._exchange import exchange

        placed, frames.placed = frames.placed, []
        exchange().unlend(placed)


def message_size(frames: list[Any]) -> int:
    """Bytes a message moves: its frames plus what it carries in shared memory."""
    if type(frames) is Frames:
        return frames.shm_bytes + sum(memoryview(f).nbytes for f in frames)
    if len(frames) == 1:
        return len(frames[0])  # the header alone: bytes
    return sum(memoryview(f).nbytes for f in frames)
