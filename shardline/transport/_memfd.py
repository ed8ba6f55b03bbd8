"""Anonymous shared memory: sealed ``memfd`` files and raw mappings of them.

A memfd has no name in any file system (``/dev/shm`` stays empty), and the kernel frees
it once no process holds a descriptor or a mapping of it: a process that dies, even by
``kill -9``, leaves nothing behind. Mappings are made with ``mmap(2)`` through ctypes
rather than the ``mmap`` module, which keeps a duplicate descriptor open per mapping
and refuses to unmap while a view exists; here a mapping is unmapped exactly when its
owner says so, and views are plain ctypes arrays over its address.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import threading
from typing import Any

__all__ = ["Mapping", "SEALS", "check_sealed", "host_id", "new_memfd"]

_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                  ctypes.c_long]
_munmap = _libc.munmap
_munmap.restype = ctypes.c_int
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]

_PROT_RW = 0x1 | 0x2
_MAP_SHARED = 0x01
_MAP_FAILED = ctypes.c_void_p(-1).value

# A receiver maps a segment only if its sender can no longer shrink it: reading a page
# past the end of a shrunk file is a SIGBUS, which would kill the receiver.
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def host_id() -> str:
    """The same string in every process of one boot of one machine ("" if unknown):
    machine-id names the installation, boot_id the boot (pids restart at each)."""
    parts = []
    for path in ("/etc/machine-id", "/proc/sys/kernel/random/boot_id"):
        try:
            with open(path, encoding="ascii") as f:
                parts.append(f.read().strip())
        except OSError:
            return ""
    if not all(parts):
        return ""
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:32]


def new_memfd(size: int) -> int:
    """A sealed memfd of ``size`` bytes (close-on-exec: a child process started later
    never inherits it, so never keeps it alive)."""
    fd = os.memfd_create("shardline", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_sealed(fd: int, size: int) -> None:
    """``ValueError`` unless ``fd`` is a memfd sealed against shrinking that holds at
    least ``size`` bytes."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as exc:
        raise ValueError(f"not a sealable memfd ({exc.strerror})") from None
    if seals & fcntl.F_SEAL_SHRINK == 0:
        raise ValueError("the segment is not sealed against shrinking")
    actual = os.fstat(fd).st_size
    if actual < size:
        raise ValueError(f"the segment holds {actual} bytes, not the {size} announced")


class Mapping:
    """One shared read-write ``mmap`` of a memfd.

    Shared on both sides, never copy-on-write: a receiver keeps its mapping of a pooled
    segment across reuses, and a private mapping would go on showing it pages it once
    wrote to instead of what the sender put there since."""

    __slots__ = ("_lock", "address", "size")

    def __init__(self, fd: int, size: int) -> None:
        if size < 1:
            raise ValueError("cannot map an empty segment")
        address = _mmap(None, size, _PROT_RW, _MAP_SHARED, fd, 0)
        if address is None or address == _MAP_FAILED:
            err = ctypes.get_errno()
            raise OSError(err, f"mmap of {size} bytes failed: {os.strerror(err)}")
        self.address: int = address
        self.size = size
        self._lock = threading.Lock()

    def view(self, offset: int, nbytes: int) -> Any:
        """A writable buffer over ``[offset, offset + nbytes)``; it does not keep the
        mapping alive: whoever hands it out counts the views and unmaps after the last."""
        if self.address == 0:
            raise ValueError("the segment is unmapped")
        return (ctypes.c_ubyte * nbytes).from_address(self.address + offset)

    def unmap(self) -> None:
        with self._lock:
            if self.address:
                _munmap(self.address, self.size)
                self.address = 0

    @property
    def mapped(self) -> bool:
        return self.address != 0
