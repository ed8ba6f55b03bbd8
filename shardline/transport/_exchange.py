"""Shared memory between the processes of one host: each process's ``Exchange``.

A process that offers shared memory listens on an abstract Unix socket (no file: the
name vanishes with the process) named after a random 63-bit token, ``proc``, which the
``hello`` announces with the host id; device links listen on a second name derived
from their TCP address (docs/wire-protocol.md, "Shared memory").

Lending: a buffer above the threshold goes into a *segment* (a sealed memfd) instead of
a ZeroMQ frame. The segment's descriptor goes to the receiving process once, over a
SOCK_SEQPACKET connection to its socket (SCM_RIGHTS), always before the first message
that names it; messages carry only ``[proc, segment, offset, nbytes]``. A pooled
segment stays lent until the receiver says it released it; then it is reused, and
given back to the kernel once idle.

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
import contextlib
import itertools
import logging
import os
import secrets
import socket
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import msgpack

from .._errors import ProtocolError
from ._memfd import Mapping, check_sealed, host_id
from ._segments import IDLE_S, MAX_IDLE_BYTES, Pool, Segment, size_class
from ._shmsock import (
    CREDS,
    FORGET,
    HELLO,
    MAX_SEGMENT,
    RELEASE,
    SEGMENT,
    SEND_FLAGS,
    Conn,
    Lender,
    Link,
    Received,
    alias_name,
    is_id,
    parse,
    receive,
    seqpacket,
    socket_name,
)

__all__ = ["Exchange", "Link", "exchange", "poll_exchange", "size_class", "socket_name"]

log = logging.getLogger("shardline.transport")


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
        self.gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._listeners: dict[str, socket.socket] = {}
        self._unavailable = not self.host
        self._links: dict[str, Link] = {}           # by the socket name we connected to
        self._unreachable: set[str] = set()
        self._lenders: list[Lender] = []
        self._received: dict[tuple[int, int], Received] = {}  # (proc, segment)
        self._segments: dict[int, Segment] = {}     # ours, by id
        self._pool = Pool()
        self._lent: dict[int, tuple[Link, Any]] = {}  # id -> holder, kept object
        self._user_starts: list[int] = []           # user segments by address
        self._user: dict[int, Segment] = {}
        self._dropped: deque[Received] = deque()
        self._retired: deque[Segment] = deque()
        self._abandoned = False  # a forked child's copy

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
        if self._abandoned:
            return
        if self._lock.acquire(blocking=False):
            try:
                self._flush()
            finally:
                self._lock.release()

    # -- connecting --------------------------------------------------------------------

    def _listen(self, name: str) -> bool:
        """Listen on abstract socket ``name`` (lock held)."""
        if self._unavailable:
            return False
        if name in self._listeners:
            return True
        sock = seqpacket()
        try:
            sock.bind(name)
            sock.listen(128)
        except OSError as exc:
            sock.close()
            log.info("no shared memory at %r: %s", name[1:], exc)
            return False
        self._listeners[name] = sock
        return True

    def hello_info(self) -> dict[str, Any] | None:
        """What a ``hello`` says about shared memory (None: not offered)."""
        with self._lock:
            if not self._listen(socket_name(self.proc)):
                self._unavailable = True
                return None
        return {"host": self.host, "pid": self.pid, "proc": self.proc, "gpus": self.gpus}

    def listen_at(self, address: str) -> bool:
        """Also take connections from lenders that know this process only by the TCP
        ``address`` it listens at (a device link)."""
        if self.hello_info() is None:
            return False
        with self._lock:
            return self._listen(alias_name(address))

    def stop_listening_at(self, address: str) -> None:
        with self._lock:
            sock = self._listeners.pop(alias_name(address), None)
            if sock is not None:
                sock.close()

    def link_to(self, info: Any) -> Link | None:
        """The link to the process a ``hello``'s ``shm`` describes, if it is on this host
        and reachable (another network namespace is not: its sockets are its own)."""
        if not isinstance(info, dict) or not self.host or info.get("host") != self.host:
            return None
        proc = info.get("proc")
        if not isinstance(proc, int) or not is_id(proc):
            return None
        gpus = info.get("gpus")
        return self._connect(socket_name(proc), proc, gpus if isinstance(gpus, str) else None)

    def link_to_address(self, address: str) -> Link | None:
        """The link to the process listening at TCP ``address``, if it is one of this
        host's and takes shared memory there (``listen_at``); its ``gpus`` are known
        once its HELLO has been read."""
        return self._connect(alias_name(address), None, None)

    def _connect(self, name: str, proc: int | None, gpus: str | None) -> Link | None:
        with self._locked():
            link = self._links.get(name)
            if link is not None:
                if link.alive:
                    return link
                self._link_gone(link)  # a send failed: its process closed the connection
            if name in self._unreachable or self._unavailable:
                return None
            sock = seqpacket()
            try:
                sock.connect(name)
                sock.send(msgpack.packb([HELLO, self.proc, self.gpus]), SEND_FLAGS)
            except BlockingIOError:
                sock.close()  # its backlog is full: TCP this time, try again later
                return None
            except OSError as exc:
                sock.close()
                self._unreachable.add(name)
                log.debug("no shared memory toward %r: %s", name[1:], exc)
                return None
            link = self._links[name] = Link(sock)
            if proc is not None:
                link.proc, link.gpus, link.confirmed = proc, gpus, True
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
                self._pool.put(seg)
                return None
            self._lend(link, seg.id, None)
        return seg.mapping.view(0, nbytes), [self.proc, seg.id, 0, nbytes]

    def share(self, link: Link, address: int, nbytes: int) -> list[int] | None:
        """The descriptor of ``[address, address + nbytes)`` if it lies in a segment of
        this process (``shared_empty``): nothing is copied, and nothing is reused, so
        nothing waits for a release. None: it does not lie in one."""
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
        return [self.proc, seg.id, address - start, nbytes]

    def keep(self, link: Link, obj: Any) -> int:
        """Hold ``obj`` until ``link``'s process releases the returned token (or dies)."""
        with self._locked():
            token = next(self._ids)
            self._lend(link, token, obj)
        return token

    def unlend(self, placed: list[tuple[Link, int]]) -> None:
        """Frames that were never sent: their segments and tokens are free again."""
        with self._locked():
            for _, ident in placed:
                self._released(ident)

    def allocate(self, nbytes: int) -> Any:
        """A writable buffer of ``nbytes`` in a segment of its own, which lives as long
        as the buffer does (``shared_empty``); sending it copies nothing."""
        seg = Segment(next(self._ids), nbytes, pooled=False)
        buf = seg.mapping.view(0, nbytes)
        with self._locked():
            self._segments[seg.id] = seg
            bisect.insort(self._user_starts, seg.mapping.address)
            self._user[seg.mapping.address] = seg
        weakref.finalize(buf, self._retire_later, seg).atexit = False
        return buf

    def _lend(self, link: Link, ident: int, obj: Any) -> None:
        self._lent[ident] = (link, obj)
        link.lent.add(ident)

    def _take(self, nbytes: int) -> Segment | None:
        size = size_class(nbytes)
        seg = self._pool.take(size)
        if seg is None:
            self._read_links()  # releases may be waiting there
            seg = self._pool.take(size)
        if seg is not None:
            return seg
        try:
            seg = Segment(next(self._ids), size, pooled=True)
        except OSError as exc:
            log.warning("no shared-memory segment of %d bytes (%s): sending over TCP", size,
                        exc)
            return None
        self._segments[seg.id] = seg
        return seg

    def _hand(self, link: Link, seg: Segment) -> bool:
        """Make sure ``link``'s process has ``seg``'s descriptor (sent before any
        message that names it)."""
        if link in seg.holders:
            return True
        try:
            link.sock.sendmsg([msgpack.packb([SEGMENT, seg.id, seg.size])],
                              [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                array.array("i", [seg.fd]))], SEND_FLAGS)
        except OSError as exc:
            if not isinstance(exc, BlockingIOError):
                link.alive = False  # gone: what it held comes back when its EOF is read
            return False
        seg.holders.add(link)
        return True

    def _released(self, ident: int) -> None:
        held = self._lent.pop(ident, None)
        if held is None:
            return  # a user segment (never waited for), or released already
        held[0].lent.discard(ident)
        seg = self._segments.get(ident)
        if seg is not None and seg.pooled:
            self._pool.put(seg)
            if self._pool.idle_bytes > MAX_IDLE_BYTES:
                self._trim(time.monotonic())

    def _trim(self, now: float) -> None:
        for seg in self._pool.expired(now):
            self._retire(seg)

    def _retire_later(self, seg: Segment) -> None:
        self._retired.append(seg)  # a finalizer: any thread, maybe inside a locked section
        self._try_flush()

    def _retire(self, seg: Segment) -> None:
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
            rec = self._received.get((proc, seg_id))
            if rec is None:
                self._read_lenders()  # its descriptor was sent before the message
                rec = self._received.get((proc, seg_id))
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
            lender = self._lender_of(proc)
            if lender is None:
                self._read_lenders()
                lender = self._lender_of(proc)
            if lender is not None:
                self._send_later(lender, [RELEASE, token, 1])

    def _lender_of(self, proc: int) -> Lender | None:
        for lender in self._lenders:
            if lender.proc == proc and lender.alive:
                return lender
        return None

    def _view_dropped(self, rec: Received) -> None:
        self._dropped.append(rec)  # a finalizer: see _retire_later
        self._try_flush()

    @staticmethod
    def _forget(rec: Received) -> None:
        rec.forgotten = True
        if rec.views == 0:
            rec.mapping.unmap()

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
            self._trim(time.monotonic() + IDLE_S)

    def _flush(self) -> None:
        if self._dropped:
            releases: Counter[tuple[Lender, int]] = Counter()
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
        for conn in (*self._links.values(), *self._lenders):
            if conn.unsent and conn.alive:
                self._send_queued(conn)

    def _send_later(self, conn: Conn, msg: list[Any]) -> None:
        conn.unsent.append(msgpack.packb(msg))
        self._send_queued(conn)

    @staticmethod
    def _send_queued(conn: Conn) -> None:
        while conn.unsent:
            try:
                conn.sock.send(conn.unsent[0], SEND_FLAGS)
            except BlockingIOError:
                return  # its buffer is full: the next flush tries again
            except OSError:
                conn.alive = False  # gone: the next read of it cleans up
                conn.unsent.clear()
                return
            conn.unsent.popleft()

    def _read_lenders(self) -> None:
        for listener in self._listeners.values():
            while True:
                try:
                    sock, _ = listener.accept()
                except BlockingIOError:
                    break
                except OSError as exc:
                    log.warning("shared-memory socket: accept failed: %s", exc)
                    break
                uid = CREDS.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                    CREDS.size))[1]
                if uid != os.getuid():
                    log.warning("refused a shared-memory connection from uid %d", uid)
                    sock.close()
                    continue
                sock.setblocking(False)
                lender = Lender(sock)
                self._lenders.append(lender)
                # Who we are, for a lender that found us by TCP address.
                self._send_later(lender, [HELLO, self.proc, self.gpus])
        for lender in list(self._lenders):
            self._read_lender(lender)

    def _read_lender(self, lender: Lender) -> None:
        while True:
            # A send that failed marked it dead: treat as the end of the connection.
            got = receive(lender.sock) if lender.alive else (b"", [])
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
                    os.close(fd)

    def _on_lender_message(self, lender: Lender, data: bytes, fds: list[int]) -> None:
        msg = parse(data)
        kind = msg[0]
        if kind == HELLO and lender.proc is None:
            lender.proc, lender.gpus = msg[1], msg[2]
        elif lender.proc is None:
            raise ValueError("a message before HELLO")
        elif kind == SEGMENT and len(msg) == 3 and len(fds) == 1:
            _, seg, size = msg
            if not 0 < size <= MAX_SEGMENT:
                raise ValueError(f"segment size {size} out of range")
            check_sealed(fds[0], size)
            mapping = Mapping(fds[0], size)
            replaced = self._received.pop((lender.proc, seg), None)
            if replaced is not None:
                replaced.lender.segments.discard(seg)
                self._forget(replaced)
            self._received[(lender.proc, seg)] = Received(lender, seg, mapping)
            lender.segments.add(seg)
        elif kind == FORGET and len(msg) == 2:
            rec = self._received.get((lender.proc, msg[1]))
            if rec is not None and rec.lender is lender:
                del self._received[(lender.proc, msg[1])]
                lender.segments.discard(msg[1])
                self._forget(rec)
        else:
            raise ValueError(f"unexpected message {msg!r:.80} with {len(fds)} descriptors")

    def _lender_gone(self, lender: Lender) -> None:
        """Its process ended: what we mapped stays valid while our views live."""
        lender.alive = False
        lender.sock.close()
        if lender in self._lenders:
            self._lenders.remove(lender)
        for seg in lender.segments:
            rec = self._received.pop((lender.proc or 0, seg), None)
            if rec is not None:
                self._forget(rec)
        lender.segments.clear()

    def _read_links(self) -> None:
        for link in list(self._links.values()):
            while True:
                got = receive(link.sock) if link.alive else (b"", [])
                if got is None:
                    break
                data, fds = got
                for fd in fds:
                    os.close(fd)
                if not data:
                    self._link_gone(link)
                    break
                try:
                    msg = parse(data)
                except (ValueError, TypeError, msgpack.UnpackException) as exc:
                    log.warning("dropped a bad shared-memory message: %s", exc)
                    continue
                if msg[0] == RELEASE and len(msg) == 3 and msg[1] in link.lent:
                    self._released(msg[1])
                elif msg[0] == HELLO and not link.confirmed:
                    link.proc, link.gpus, link.confirmed = msg[1], msg[2], True

    def _link_gone(self, link: Link) -> None:
        """Its process ended: everything lent to it is free again."""
        link.alive = False
        link.sock.close()
        for name, known in list(self._links.items()):
            if known is link:
                del self._links[name]
        for ident in list(link.lent):
            self._released(ident)
        for seg in self._segments.values():
            seg.holders.discard(link)

    def abandon(self) -> None:
        """In a forked child: close the descriptors inherited from the parent's exchange
        (holding them would keep its segments and connections alive), touching nothing
        else; the child makes an exchange of its own when it needs one."""
        self._abandoned = True  # its lock may be held by a thread the child lacks
        for conn in (*self._links.values(), *self._lenders):
            conn.sock.close()
        for sock in self._listeners.values():
            sock.close()
        for seg in self._segments.values():
            with contextlib.suppress(OSError):
                os.close(seg.fd)

    def close(self) -> None:
        """Close every socket (at exit). Mappings stay: views may outlive this."""
        if self._abandoned:
            return
        with self._lock:
            for conn in (*self._links.values(), *self._lenders):
                conn.alive = False
                conn.sock.close()
            self._links.clear()
            self._lenders.clear()
            for sock in self._listeners.values():
                sock.close()
            self._listeners.clear()
            self._unavailable = True

    # -- introspection ------------------------------------------------------------------------

    def statistics(self) -> dict[str, int]:
        with self._locked():
            return {
                "segments": len(self._segments),
                "free_segments": len(self._pool),
                "free_bytes": self._pool.idle_bytes,
                "lent": len(self._lent),
                "links": len(self._links),
                "lenders": len(self._lenders),
                "received": len(self._received),
            }


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


def _after_fork_in_child() -> None:
    global _EXCHANGE
    if _EXCHANGE is not None:
        _EXCHANGE.abandon()
        _EXCHANGE = None


os.register_at_fork(after_in_child=_after_fork_in_child)


def poll_exchange() -> None:
    """``poll()`` this process's exchange, if it has one (a cheap no-op otherwise)."""
    ex = _EXCHANGE
    if ex is not None and ex.pid == os.getpid():
        ex.poll()
