"""Shared memory between the processes of one host: each process's ``Exchange``.

A process that offers shared memory listens on an abstract Unix socket (no file:
the name vanishes with the process) named after a random 63-bit token, ``proc``,
which the ``hello`` announces together with the host id (docs/wire-protocol.md).

Lending (the sending side): a buffer above the threshold goes into a *segment* (a
sealed memfd) instead of a ZeroMQ frame. The segment's file descriptor goes to the
receiving process once, over a SOCK_SEQPACKET connection to its socket (SCM_RIGHTS),
always before the first message that names it; messages then carry only
``[proc, segment, offset, nbytes]``. A pooled segment stays lent until the receiver
says it released it; then it is reused, and given back to the kernel once idle.

Receiving: a message that names a segment not seen yet drains the connections (its
descriptor is already there, since it was sent first), maps it once, and hands out
views; the finalizer of each view releases it.

Nothing here blocks, so nothing here needs a thread of its own: the sockets are read
when a lookup misses and on every ``poll()`` (heartbeats, idle device ticks).
"""

from __future__ import annotations

import array
import atexit
import bisect
import itertools
import logging
import os
import secrets
import socket
import struct
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import msgpack

from .._errors import ProtocolError
from ._memfd import Mapping, check_sealed, host_id, new_memfd

__all__ = ["Exchange", "Link", "exchange", "poll_exchange", "size_class", "socket_name"]

log = logging.getLogger("shardline.transport")

# Datagrams on a lender's connection: lender -> receiver HELLO, SEGMENT (+ one
# descriptor), FORGET; receiver -> lender RELEASE.
HELLO, SEGMENT, FORGET, RELEASE = 0, 1, 2, 3
_MAX_SEGMENT = 1 << 40
_IDLE_S = 10.0               # a pooled segment unused this long goes back to the kernel
_MAX_IDLE_BYTES = 512 << 20  # and so does the oldest, past this many idle bytes
_FDS = socket.CMSG_SPACE(4 * array.array("i").itemsize)
_SEND = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
_CREDS = struct.Struct("3i")


def socket_name(proc: int) -> str:
    """The abstract Unix socket of the process whose token is ``proc``."""
    return f"\0shardline/{proc:016x}"


def size_class(n: int) -> int:
    """The segment size for an ``n``-byte buffer: at most 1/8 above it, whole pages, so
    that buffers of about the same size reuse the same pooled segments."""
    step = max((1 << max(0, n.bit_length() - 1)) >> 3, 4096)
    return -(-n // step) * step


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 64


class _Segment:
    """A memfd of this process and its mapping: pooled (frames are copied into it) or
    a user's (``shared_empty``: a tensor lives in it and travels without a copy)."""

    __slots__ = ("fd", "holders", "id", "idle_since", "lent_to", "mapping", "pooled", "size")

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
        self.holders: set[Link] = set()   # links whose process has the descriptor
        self.lent_to: Link | None = None  # pooled: who holds the one frame in it
        self.idle_since = 0.0

    def close(self) -> None:
        self.mapping.unmap()
        os.close(self.fd)


class _Conn:
    """One end of a lender connection: its socket and what could not be sent yet."""

    __slots__ = ("alive", "sock", "unsent")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.alive = True
        self.unsent: deque[bytes] = deque()


class Link(_Conn):
    """This process lending to another process on the host (``proc``)."""

    __slots__ = ("gpus", "kept", "lent", "proc")

    def __init__(self, proc: int, sock: socket.socket) -> None:
        super().__init__(sock)
        self.proc = proc
        self.gpus: str | None = None  # its CUDA_VISIBLE_DEVICES: IPC needs the same
        self.lent: dict[int, int] = {}  # segment id or keep token -> frames outstanding
        self.kept: dict[int, Any] = {}  # keep token -> what it keeps alive

    def __repr__(self) -> str:
        return f"<shm link to {self.proc:016x}, {len(self.lent)} lent>"


class _Lender(_Conn):
    """A process lending to this one: the segments it sent and our mappings of them."""

    __slots__ = ("proc", "segments")

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self.proc: int | None = None  # known from its HELLO
        self.segments: dict[int, _Received] = {}


class _Received:
    __slots__ = ("forgotten", "lender", "mapping", "seg", "views")

    def __init__(self, lender: _Lender, seg: int, mapping: Mapping) -> None:
        self.lender = lender
        self.seg = seg
        self.mapping = mapping
        self.views = 0
        self.forgotten = False  # the lender will not name it again: unmap after the views


class Exchange:
    """This process's shared memory: segments it lends, segments it was lent.

    Thread-safe: event loops, device threads and finalizers (any thread, at any time)
    use it. Finalizers never block: they queue their work and take the lock only if it
    is free; whoever holds it next does the work.
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.host = host_id()
        self.proc = secrets.randbits(63) or 1
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._listener: socket.socket | None = None
        self._unavailable = not self.host
        self._links: dict[int, Link] = {}
        self._unreachable: set[int] = set()
        self._pending: list[_Lender] = []        # accepted, HELLO not read yet
        self._lenders: dict[int, _Lender] = {}   # by their proc
        self._segments: dict[int, _Segment] = {}
        self._free: dict[int, list[_Segment]] = {}
        self._free_bytes = 0
        self._user_starts: list[int] = []        # user segments by address, for ``share``
        self._user: dict[int, _Segment] = {}
        self._dropped: deque[_Received] = deque()
        self._retired: deque[_Segment] = deque()

    # -- locking -----------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._lock:
            try:
                yield
            finally:
                self._flush()
        if self._dropped or self._retired:
            self._try_flush()

    def _try_flush(self) -> None:
        if self._lock.acquire(blocking=False):
            try:
                self._flush()
            finally:
                self._lock.release()

    # -- handshake -----------------------------------------------------------------------

    def hello_info(self) -> dict[str, Any] | None:
        """What a ``hello`` says about shared memory (None: not offered)."""
        with self._lock:
            if self._listener is None and not self._unavailable:
                sock = _seqpacket()
                try:
                    sock.bind(socket_name(self.proc))
                    sock.listen(128)
                except OSError as exc:
                    sock.close()
                    self._unavailable = True
                    log.info("no shared memory between processes: %s", exc)
                else:
                    self._listener = sock
            if self._listener is None:
                return None
        return {"host": self.host, "pid": self.pid, "proc": self.proc,
                "gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}

    def link_to(self, info: Any) -> Link | None:
        """The link to the process a ``hello``'s ``shm`` describes, if it is on this host
        and reachable (another network namespace is not: its sockets are its own)."""
        if not isinstance(info, dict) or not self.host or info.get("host") != self.host:
            return None
        proc = info.get("proc")
        if not isinstance(proc, int) or not _is_id(proc):
            return None
        with self._locked():
            link = self._links.get(proc)
            if link is not None:
                if link.alive:
                    return link
                self._link_gone(link)  # a send failed: its process closed the connection
            if proc in self._unreachable:
                return None
            sock = _seqpacket()
            try:
                sock.connect(socket_name(proc))
                sock.send(msgpack.packb([HELLO, self.proc]), _SEND)
            except BlockingIOError:
                sock.close()  # its backlog is full: TCP this time, try again next hello
                return None
            except OSError as exc:
                sock.close()
                self._unreachable.add(proc)
                log.info("process %016x on this host is unreachable for shared memory: %s",
                         proc, exc)
                return None
            link = self._links[proc] = Link(proc, sock)
            gpus = info.get("gpus")
            link.gpus = gpus if isinstance(gpus, str) else None
            return link

    # -- lending ---------------------------------------------------------------------------

    def reserve(self, link: Link, nbytes: int) -> tuple[Any, list[int]] | None:
        """A pooled segment lent to ``link`` for one ``nbytes`` buffer: a writable view
        to fill, and the descriptor that names it. None: send it as a frame."""
        with self._locked():
            if not link.alive:
                return None
            seg = self._take(nbytes)
            if seg is None:
                return None
            if not self._hand(link, seg):
                self._put_back(seg)
                return None
            seg.lent_to = link
            link.lent[seg.id] = 1
        return seg.mapping.view(0, nbytes), [self.proc, seg.id, 0, nbytes]

    def share(self, link: Link, address: int, nbytes: int) -> list[int] | None:
        """The descriptor of ``[address, address + nbytes)`` if it lies in a segment of
        this process (``shared_empty``): nothing is copied. None: it does not."""
        if not self._user_starts:
            return None
        with self._locked():
            i = bisect.bisect_right(self._user_starts, address) - 1
            if i < 0 or not link.alive:
                return None
            seg = self._user[self._user_starts[i]]
            start = seg.mapping.address
            if address + nbytes > start + seg.size or not self._hand(link, seg):
                return None
            link.lent[seg.id] = link.lent.get(seg.id, 0) + 1
        return [self.proc, seg.id, address - start, nbytes]

    def keep(self, link: Link, obj: Any) -> int:
        """Hold ``obj`` until ``link``'s process releases the returned token (or dies)."""
        with self._locked():
            token = next(self._ids)
            link.kept[token] = obj
            link.lent[token] = 1
        return token

    def unlend(self, placed: list[tuple[Link, int]]) -> None:
        """Frames that were never sent: their segments and tokens are free again."""
        with self._locked():
            for link, ident in placed:
                self._released(link, ident, 1)

    def allocate(self, nbytes: int) -> Any:
        """A writable buffer of ``nbytes`` in a segment of its own, which lives as long
        as the buffer does (``shared_empty``); sending it copies nothing."""
        seg = _Segment(next(self._ids), nbytes, pooled=False)
        buf = seg.mapping.view(0, nbytes)
        with self._locked():
            self._segments[seg.id] = seg
            bisect.insort(self._user_starts, seg.mapping.address)
            self._user[seg.mapping.address] = seg
        weakref.finalize(buf, self._retire_later, seg).atexit = False
        return buf

    def _take(self, nbytes: int) -> _Segment | None:
        size = size_class(nbytes)
        free = self._free.get(size)
        if not free:
            self._read_links()  # releases may be waiting there
            free = self._free.get(size)
        if free:
            seg = free.pop()
            self._free_bytes -= seg.size
            return seg
        try:
            seg = _Segment(next(self._ids), size, pooled=True)
        except OSError as exc:
            log.warning("no shared-memory segment of %d bytes (%s): sending over TCP", size,
                        exc)
            return None
        self._segments[seg.id] = seg
        return seg

    def _hand(self, link: Link, seg: _Segment) -> bool:
        """Make sure ``link``'s process has ``seg``'s descriptor (sent before any
        message that names it)."""
        if link in seg.holders:
            return True
        try:
            link.sock.sendmsg([msgpack.packb([SEGMENT, seg.id, seg.size])],
                              [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                array.array("i", [seg.fd]))], _SEND)
        except OSError as exc:
            if not isinstance(exc, BlockingIOError):
                link.alive = False  # gone: what it held comes back when its EOF is read
            return False
        seg.holders.add(link)
        return True

    def _put_back(self, seg: _Segment) -> None:
        seg.lent_to = None
        seg.idle_since = time.monotonic()
        self._free.setdefault(seg.size, []).append(seg)
        self._free_bytes += seg.size
        if self._free_bytes > _MAX_IDLE_BYTES:
            self._trim(seg.idle_since)

    def _released(self, link: Link, ident: int, n: int) -> None:
        left = link.lent.get(ident, 0) - n
        if left > 0:
            link.lent[ident] = left
            return
        link.lent.pop(ident, None)
        link.kept.pop(ident, None)
        seg = self._segments.get(ident)
        if seg is not None and seg.pooled and seg.lent_to is link:
            self._put_back(seg)

    def _trim(self, now: float) -> None:
        """Give idle pooled segments back: those unused for a while, and the oldest
        while too many bytes sit idle."""
        idle = sorted((s for free in self._free.values() for s in free),
                      key=lambda s: s.idle_since)
        for seg in idle:
            if now - seg.idle_since < _IDLE_S and self._free_bytes <= _MAX_IDLE_BYTES:
                break
            self._free[seg.size].remove(seg)
            self._free_bytes -= seg.size
            self._retire(seg)

    def _retire_later(self, seg: _Segment) -> None:
        self._retired.append(seg)  # a finalizer: any thread, maybe inside a locked section
        self._try_flush()

    def _retire(self, seg: _Segment) -> None:
        for link in seg.holders:
            if link.alive:
                self._send_later(link, [FORGET, seg.id])
        seg.holders.clear()
        self._segments.pop(seg.id, None)
        if not seg.pooled:
            start = seg.mapping.address
            self._user.pop(start, None)
            i = bisect.bisect_left(self._user_starts, start)
            if i < len(self._user_starts) and self._user_starts[i] == start:
                del self._user_starts[i]
        seg.close()

    # -- receiving --------------------------------------------------------------------------

    def view(self, proc: int, seg_id: int, offset: int, nbytes: int) -> Any:
        """A writable buffer over ``nbytes`` at ``offset`` of segment ``seg_id`` that
        process ``proc`` lent this one; released when the buffer is garbage."""
        with self._locked():
            rec = self._find(proc, seg_id)
            if rec is None:
                self._read_lenders()  # its descriptor was sent before the message
                rec = self._find(proc, seg_id)
            if rec is None:
                raise ProtocolError(f"shared-memory segment {seg_id} of process {proc:016x} "
                                    "is unknown here")
            if offset + nbytes > rec.mapping.size:
                raise ProtocolError(f"shared-memory segment {seg_id} holds {rec.mapping.size} "
                                    f"bytes; {nbytes} at offset {offset} overrun it")
            rec.views += 1
        buf = rec.mapping.view(offset, nbytes)
        weakref.finalize(buf, self._view_dropped, rec).atexit = False
        return buf

    def acknowledge(self, proc: int, token: int) -> None:
        """Tell process ``proc`` that this one is done with its token (CUDA keep-alive)."""
        with self._locked():
            lender = self._lenders.get(proc)
            if lender is None:
                self._read_lenders()
                lender = self._lenders.get(proc)
            if lender is not None and lender.alive:
                self._send_later(lender, [RELEASE, token, 1])

    def _find(self, proc: int, seg_id: int) -> _Received | None:
        lender = self._lenders.get(proc)
        return None if lender is None else lender.segments.get(seg_id)

    def _view_dropped(self, rec: _Received) -> None:
        self._dropped.append(rec)  # a finalizer: see _retire_later
        self._try_flush()

    # -- the sockets ------------------------------------------------------------------------

    def poll(self) -> None:
        """Read every connection and give idle segments back (never blocks)."""
        with self._locked():
            self._read_lenders()
            self._read_links()
            self._trim(time.monotonic())

    def release_idle(self) -> None:
        """Read every connection, then give every pooled segment not lent back to the
        kernel now (memory pressure; tests that count mappings)."""
        with self._locked():
            self._read_lenders()
            self._read_links()
            self._trim(time.monotonic() + _IDLE_S)

    def _flush(self) -> None:
        if self._dropped:
            releases: Counter[tuple[_Lender, int]] = Counter()
            while self._dropped:
                rec = self._dropped.popleft()
                rec.views -= 1
                releases[(rec.lender, rec.seg)] += 1
                if rec.views == 0 and rec.forgotten:
                    rec.mapping.unmap()
            for (lender, seg), n in releases.items():
                if lender.alive:
                    self._send_later(lender, [RELEASE, seg, n])
        while self._retired:
            self._retire(self._retired.popleft())
        for conn in (*self._links.values(), *self._lenders.values()):
            if conn.unsent and conn.alive:
                self._send_queued(conn)

    def _send_later(self, conn: _Conn, msg: list[int]) -> None:
        conn.unsent.append(msgpack.packb(msg))
        self._send_queued(conn)

    def _send_queued(self, conn: _Conn) -> None:
        while conn.unsent:
            try:
                conn.sock.send(conn.unsent[0], _SEND)
            except BlockingIOError:
                return  # its buffer is full: the next flush tries again
            except OSError:
                conn.alive = False
                conn.unsent.clear()
                return
            conn.unsent.popleft()

    def _read_lenders(self) -> None:
        listener = self._listener
        while listener is not None:
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                break
            except OSError as exc:
                log.warning("shared-memory socket: accept failed: %s", exc)
                break
            uid = _CREDS.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                _CREDS.size))[1]
            if uid != os.getuid():
                log.warning("refused a shared-memory connection from uid %d", uid)
                sock.close()
                continue
            sock.setblocking(False)
            self._pending.append(_Lender(sock))
        for lender in (*self._pending, *self._lenders.values()):
            self._read_lender(lender)

    def _read_lender(self, lender: _Lender) -> None:
        while True:
            # A send that failed marked it dead: treat as the end of the connection.
            got = _receive(lender.sock) if lender.alive else (b"", [])
            if got is None:
                return
            data, fds = got
            if not data and not fds:
                self._lender_gone(lender)
                return
            try:
                self._on_lender_message(lender, data, fds)
            except (ValueError, TypeError, OSError, msgpack.UnpackException) as exc:
                log.warning("dropped a bad shared-memory message: %s", exc)
            finally:
                for fd in fds:
                    if fd >= 0:
                        os.close(fd)

    def _on_lender_message(self, lender: _Lender, data: bytes, fds: list[int]) -> None:
        msg = msgpack.unpackb(data)
        if not isinstance(msg, list) or not msg or not all(_is_id(v) for v in msg):
            raise ValueError(f"malformed message {msg!r:.80}")
        kind = msg[0]
        if kind == HELLO and len(msg) == 2 and lender.proc is None:
            proc = msg[1]
            old = self._lenders.get(proc)
            if old is not None:  # it reconnected: the old connection is dead to it
                self._lender_gone(old)
            lender.proc = proc
            self._pending.remove(lender)
            self._lenders[proc] = lender
        elif lender.proc is None:
            raise ValueError("a message before HELLO")
        elif kind == SEGMENT and len(msg) == 3 and len(fds) == 1:
            _, seg, size = msg
            if not 0 < size <= _MAX_SEGMENT:
                raise ValueError(f"segment size {size} out of range")
            check_sealed(fds[0], size)
            mapping = Mapping(fds[0], size)
            replaced = lender.segments.pop(seg, None)
            if replaced is not None:
                self._forget(replaced)
            lender.segments[seg] = _Received(lender, seg, mapping)
        elif kind == FORGET and len(msg) == 2:
            rec = lender.segments.pop(msg[1], None)
            if rec is not None:
                self._forget(rec)
        else:
            raise ValueError(f"unexpected message {msg!r:.80} with {len(fds)} descriptors")

    @staticmethod
    def _forget(rec: _Received) -> None:
        rec.forgotten = True
        if rec.views == 0:
            rec.mapping.unmap()

    def _lender_gone(self, lender: _Lender) -> None:
        """Its process ended: what we mapped stays valid while our views live."""
        lender.alive = False
        lender.sock.close()
        if lender.proc is not None and self._lenders.get(lender.proc) is lender:
            del self._lenders[lender.proc]
        elif lender in self._pending:
            self._pending.remove(lender)
        for rec in lender.segments.values():
            self._forget(rec)
        lender.segments.clear()

    def _read_links(self) -> None:
        for link in list(self._links.values()):
            while True:
                got = _receive(link.sock) if link.alive else (b"", [])
                if got is None:
                    break
                data, fds = got
                for fd in fds:
                    os.close(fd)
                if not data:
                    self._link_gone(link)
                    break
                try:
                    msg = msgpack.unpackb(data)
                    if not (isinstance(msg, list) and len(msg) == 3 and msg[0] == RELEASE
                            and _is_id(msg[1]) and _is_id(msg[2])):
                        raise ValueError(f"unexpected message {msg!r:.80}")
                except (ValueError, msgpack.UnpackException) as exc:
                    log.warning("dropped a bad shared-memory message: %s", exc)
                    continue
                self._released(link, msg[1], msg[2])

    def _link_gone(self, link: Link) -> None:
        """Its process ended: everything lent to it is free again."""
        link.alive = False
        link.sock.close()
        if self._links.get(link.proc) is link:
            del self._links[link.proc]
        for ident, n in list(link.lent.items()):
            self._released(link, ident, n)
        link.kept.clear()
        for seg in self._segments.values():
            seg.holders.discard(link)

    def close(self) -> None:
        """Close every socket (at exit). Mappings stay: views may outlive this."""
        with self._lock:
            for conn in (*self._links.values(), *self._lenders.values(), *self._pending):
                conn.alive = False
                conn.sock.close()
            self._links.clear()
            self._lenders.clear()
            self._pending.clear()
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            self._unavailable = True

    # -- introspection ------------------------------------------------------------------------

    def statistics(self) -> dict[str, int]:
        with self._locked():
            return {
                "segments": len(self._segments),
                "free_segments": sum(len(f) for f in self._free.values()),
                "free_bytes": self._free_bytes,
                "lent": sum(len(link.lent) for link in self._links.values()),
                "kept": sum(len(link.kept) for link in self._links.values()),
                "links": len(self._links),
                "lenders": len(self._lenders),
                "received": sum(len(lender.segments) for lender in self._lenders.values()),
            }


def _seqpacket() -> socket.socket:
    return socket.socket(socket.AF_UNIX,
                         socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)


def _receive(sock: socket.socket) -> tuple[bytes, list[int]] | None:
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


_EXCHANGE: Exchange | None = None
_EXCHANGE_LOCK = threading.Lock()


def exchange() -> Exchange:
    """This process's exchange (a forked child gets its own)."""
    global _EXCHANGE
    ex = _EXCHANGE
    if ex is None or ex.pid != os.getpid():
        with _EXCHANGE_LOCK:
            ex = _EXCHANGE
            if ex is None or ex.pid != os.getpid():
                ex = _EXCHANGE = Exchange()
                atexit.register(ex.close)
    return ex


def poll_exchange() -> None:
    """``poll()`` this process's exchange, if it has one (a cheap no-op otherwise)."""
    ex = _EXCHANGE
    if ex is not None and ex.pid == os.getpid():
        ex.poll()
