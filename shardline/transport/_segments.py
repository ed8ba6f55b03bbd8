"""The segments a process lends: sealed memfds with a mapping, and the pool that reuses
them once their receivers let go (the exchange's lending side)."""

from __future__ import annotations

import os
import time
from typing import Any

from ._memfd import Mapping, new_memfd

__all__ = ["Pool", "Segment", "size_class"]

IDLE_S = 10.0               # a pooled segment unused this long goes back to the kernel
MAX_IDLE_BYTES = 512 << 20  # and so does the oldest, past this many idle bytes


def size_class(n: int) -> int:
    """The segment size for an ``n``-byte buffer: at most 1/8 above it, whole pages, so
    that buffers of about the same size reuse the same pooled segments."""
    step = max((1 << max(0, n.bit_length() - 1)) >> 3, 4096)
    return -(-n // step) * step


class Segment:
    """A memfd of this process and its mapping: pooled (frames are copied into it) or
    a user's (``shared_empty``: a tensor lives in it and travels without a copy)."""

    __slots__ = ("fd", "holders", "id", "idle_since", "mapping", "pooled", "size")

    def __init__(self, seg_id: int, size: int, *, pooled: bool) -> None:
        self.fd = new_memfd(size)
        try:
            self.mapping = Mapping(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise
        self.id = seg_id
        self.size = size
        self.pooled = pooled
        self.holders: set[Any] = set()  # connections whose process has the descriptor
        self.idle_since = 0.0

    def close(self) -> None:
        self.mapping.unmap()
        os.close(self.fd)


class Pool:
    """Idle pooled segments by size class. Not thread-safe: the exchange's lock guards it."""

    def __init__(self) -> None:
        self._free: dict[int, list[Segment]] = {}
        self.idle_bytes = 0

    def take(self, size: int) -> Segment | None:
        free = self._free.get(size)
        if not free:
            return None
        seg = free.pop()
        self.idle_bytes -= seg.size
        return seg

    def put(self, seg: Segment) -> None:
        seg.idle_since = time.monotonic()
        self._free.setdefault(seg.size, []).append(seg)
        self.idle_bytes += seg.size

    def expired(self, now: float) -> list[Segment]:
        """Take out the segments to give back: idle for ``IDLE_S``, and the oldest while
        more than ``MAX_IDLE_BYTES`` sit idle."""
        out = []
        for seg in sorted((s for free in self._free.values() for s in free),
                          key=lambda s: s.idle_since):
            if now - seg.idle_since < IDLE_S and self.idle_bytes <= MAX_IDLE_BYTES:
                break
            self._free[seg.size].remove(seg)
            self.idle_bytes -= seg.size
            out.append(seg)
        return out

    def __len__(self) -> int:
        return sum(len(free) for free in self._free.values())
