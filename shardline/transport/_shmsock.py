"""The segment socket between two processes of one host: its names, its datagrams,
and the two ends of a connection (docs/wire-protocol.md, "Shared memory")."""

from __future__ import annotations

import array
import os
import socket
import struct
from collections import deque
from typing import Any

import msgpack

from ._memfd import Mapping

__all__ = ["CREDS", "FORGET", "HELLO", "MAX_SEGMENT", "RELEASE", "SEGMENT", "SEND_FLAGS",
           "Conn", "Lender", "Link", "Received", "alias_name", "is_id", "parse", "receive",
           "seqpacket", "socket_name"]

# Datagrams (msgpack arrays): HELLO both ways when a connection opens; SEGMENT (with one
# descriptor) and FORGET from the lender; RELEASE from the receiver.
HELLO, SEGMENT, FORGET, RELEASE = 0, 1, 2, 3
MAX_SEGMENT = 1 << 40
_FDS = socket.CMSG_SPACE(4 * array.array("i").itemsize)
SEND_FLAGS = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
CREDS = struct.Struct("3i")  # SO_PEERCRED: pid, uid, gid


def socket_name(proc: int) -> str:
    """The abstract Unix socket of the process whose token is ``proc``."""
    return f"\0shardline/{proc:016x}"


def alias_name(address: str) -> str:
    """The abstract Unix socket of the process that listens at TCP ``address``."""
    return f"\0shardline/{address}"


def is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 64


class Conn:
    """One connection between two processes: its socket, what could not be sent yet."""

    __slots__ = ("alive", "gpus", "proc", "sock", "unsent")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.alive = True
        self.unsent: deque[bytes] = deque()
        self.proc: int | None = None   # the other process, once its HELLO was read
        self.gpus: str | None = None   # its CUDA_VISIBLE_DEVICES (IPC needs the same)


class Link(Conn):
    """A connection this process opened to lend to another one."""

    __slots__ = ("confirmed", "lent")

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self.confirmed = False  # its proc and gpus are known
        self.lent: set[int] = set()  # segment ids and keep tokens it holds

    def __repr__(self) -> str:
        proc = "?" if self.proc is None else f"{self.proc:016x}"
        return f"<shm link to {proc}, {len(self.lent)} lent>"


class Lender(Conn):
    """A connection another process opened to lend to this one."""

    __slots__ = ("segments",)

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self.segments: set[int] = set()


class Received:
    """A segment another process lent this one: our mapping and its live views."""

    __slots__ = ("forgotten", "lender", "mapping", "seg", "views")

    def __init__(self, lender: Lender, seg: int, mapping: Mapping) -> None:
        self.lender = lender
        self.seg = seg
        self.mapping = mapping
        self.views = 0
        self.forgotten = False  # the lender will not name it again: unmap after the views


def parse(data: bytes) -> list[Any]:
    """A datagram: ``[HELLO, proc, gpus]`` or ``[kind, id, ...]`` of unsigned ints."""
    msg = msgpack.unpackb(data)
    if not isinstance(msg, list) or not 2 <= len(msg) <= 3 or not is_id(msg[0]) or \
            not is_id(msg[1]):
        raise ValueError(f"malformed message {msg!r:.80}")
    if msg[0] == HELLO:
        if len(msg) != 3 or not (msg[2] is None or isinstance(msg[2], str)):
            raise ValueError(f"malformed HELLO {msg!r:.80}")
    elif len(msg) == 3 and not is_id(msg[2]):
        raise ValueError(f"malformed message {msg!r:.80}")
    return msg


def seqpacket() -> socket.socket:
    return socket.socket(socket.AF_UNIX,
                         socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)


def receive(sock: socket.socket) -> tuple[bytes, list[int]] | None:
    """One datagram and the descriptors it carried; None if nothing is waiting. A
    connection whose peer is gone reads as an empty datagram."""
    try:
        data, ancdata, flags, _ = sock.recvmsg(256, _FDS, socket.MSG_CMSG_CLOEXEC)
    except BlockingIOError:
        return None
    except OSError:
        return b"", []
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            got = array.array("i")
            got.frombytes(payload[:len(payload) - len(payload) % got.itemsize])
            fds.extend(got)
    if flags & socket.MSG_TRUNC:
        for fd in fds:
            os.close(fd)
        return b"\xc1", []  # never valid msgpack: dropped as malformed
    return data, fds
