"""A ZeroMQ socket driven straight from the event loop's reader callback.

``zmq.asyncio`` pays a future (and a poller round) per ``recv_multipart``; here the
socket's file descriptor is registered with the loop and every readable event drains
all queued messages in one go, handing each to a synchronous callback. That is what
lets 100 in-flight asks beat the plain pyzmq asyncio loop instead of trailing it.

ZeroMQ's FD is edge-triggered and a send can swallow the edge of a pending receive,
so ``ZMQ_EVENTS`` is re-checked after every message and once after sends (one check,
scheduled, covers every send of a loop iteration). Each check costs two system calls
(libzmq polls its mailbox), so none is made where it tells nothing new:

- a readable event goes straight to ``recv``, which processes the mailbox itself;
- when a message wakes a waiting task (a reply for a caller), the check for more is
  left until that task has run: the caller's next request leaves first, and the
  check then also covers the send it made.

Messages are received while ``ZMQ_EVENTS`` says one is there, never until ``EAGAIN``:
a ``zmq.Again`` costs more (the exception object and its errno lookups) than the
message itself; only the first ``recv`` of a readable event may meet one (an event
with nothing behind it).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq
from zmq.backend import Socket as _RawSocket

from ._placement import discard

__all__ = ["LoopSocket"]

log = logging.getLogger("shardline.transport")

# Messages handled per readable event before yielding to other tasks.
_BATCH = 512
# Plain ints: pyzmq's constants are enums, and enum arithmetic costs microseconds.
_EVENTS = int(zmq.EVENTS)
_POLLIN, _POLLOUT, _NOBLOCK = int(zmq.POLLIN), int(zmq.POLLOUT), int(zmq.NOBLOCK)
_MORE = int(zmq.SNDMORE) | _NOBLOCK
# pyzmq's compiled send, without the Python layer of ``send_multipart`` and ``send``
# (routing ids, groups, argument checks): 3-4 us less per message on a small VM.
_raw_send = _RawSocket.send
_raw_recv = _RawSocket.recv
_raw_get = _RawSocket.get  # getsockopt, without the Python layer


# Frames below this size are copied into ZeroMQ. Sent without a copy, a frame must be
# kept alive until ZeroMQ is done with it, which pyzmq does by messaging its garbage
# collector thread for every frame: a thread wake-up per send costs far more than
# copying a header (pyzmq's own ``send`` copies below ``zmq.COPY_THRESHOLD`` too, a check
# its compiled layer skips).
_COPY_BELOW = zmq.COPY_THRESHOLD


def send_frames(sock: zmq.Socket[Any], frames: list[Any]) -> None:
    """``sock.send_multipart(frames, NOBLOCK, copy=False)``, faster: raises
    ``zmq.Again`` before queuing anything when the socket is full (ZeroMQ takes a
    multipart message whole or not at all)."""
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        kind = type(frame)
        if kind is bytes:
            copy = len(frame) < _COPY_BELOW
        elif kind is memoryview:
            copy = frame.nbytes < _COPY_BELOW
        else:
            copy = False
        _raw_send(sock, frame, _MORE if i < last else _NOBLOCK, copy)


class LoopSocket:
    """Owns one zmq socket; ``on_message(frames)`` runs for every message received.

    ``copied`` leading frames arrive as ``bytes`` (identity, header); the rest as
    ``zmq.Frame`` whose ``.buffer`` is a zero-copy view of the received data.
    ``on_message`` returns True when it woke a task waiting for that message (see the
    module docstring: the check for more waits until that task has run).
    """

    def __init__(self, sock: zmq.Socket[Any],
                 on_message: Callable[[list[Any]], bool | None], *, copied: int) -> None:
        self.sock = sock
        self._on_message = on_message
        self._copied = copied
        self._loop = asyncio.get_running_loop()
        self._fd: int = sock.getsockopt(zmq.FD)  # type: ignore[assignment]
        self._outbox: deque[list[Any]] = deque()
        self._check_scheduled = False
        self._handling = False  # inside _on_event's loop: it re-checks after each message
        self._closed = False
        self._loop.add_reader(self._fd, self._on_event, True)
        self._schedule_check()  # anything that arrived before the reader was added

    def send(self, frames: list[Any]) -> None:
        """Queue ``frames`` for sending without blocking; order is preserved."""
        if self._closed:
            return
        if not self._outbox:
            try:
                send_frames(self.sock, frames)
            except zmq.Again:
                self._outbox.append(frames)
        else:
            self._outbox.append(frames)
        self._after_send()

    def send_or_raise(self, frames: list[Any]) -> None:
        """Send now or raise (``zmq.Again`` when full): for callers that keep their own
        queues, such as one per client of a ROUTER."""
        if self._closed:
            return
        send_frames(self.sock, frames)
        self._after_send()

    def _after_send(self) -> None:
        # A check is due anyway when one is scheduled or a handler is running (the
        # handler loop checks after each message); otherwise one is scheduled, so that
        # every send of this loop iteration shares it.
        if not (self._check_scheduled or self._handling):
            self._check_scheduled = True
            self._loop.call_soon(self._on_event, False)

    def handle_with(self, on_message: Callable[[list[Any]], bool | None]) -> None:
        """Hand later messages to ``on_message`` instead."""
        self._on_message = on_message

    @property
    def backlog(self) -> int:
        """Messages waiting for the socket to accept them (peer slow or gone)."""
        return len(self._outbox)

    def _schedule_check(self) -> None:
        if not self._check_scheduled:
            self._check_scheduled = True
            self._loop.call_soon(self._on_event, False)

    def _flush(self) -> None:
        sock = self.sock
        outbox = self._outbox
        while outbox:
            try:
                send_frames(sock, outbox[0])
            except zmq.Again:
                return
            outbox.popleft()

    def _on_event(self, readable: bool) -> None:
        """Drain the socket: ``readable`` when the loop saw the FD readable, False for
        a scheduled check."""
        if not readable:
            self._check_scheduled = False
        if self._closed:
            return
        sock = self.sock
        try:
            if not readable or self._outbox:
                events: int = _raw_get(sock, _EVENTS)  # type: ignore[assignment]
                if events & _POLLOUT and self._outbox:
                    self._flush()
                if not events & _POLLIN:
                    return
            for _ in range(_BATCH):
                try:
                    frames = self._recv()
                except zmq.Again:
                    return  # an event with no message behind it (only the first recv)
                self._handling = True
                try:
                    woke = self._on_message(frames)
                except Exception:
                    woke = False
                    log.exception("message handler raised; message dropped")
                finally:
                    self._handling = False
                if self._closed:
                    return
                if woke and readable:
                    break  # check after the woken task ran (see the module docstring)
                readable = False
                events = _raw_get(sock, _EVENTS)  # type: ignore[assignment]
                if events & _POLLOUT and self._outbox:
                    self._flush()
                if not events & _POLLIN:
                    return
        except zmq.ZMQError as exc:
            if self._closed or exc.errno == zmq.ENOTSOCK:
                return
            log.exception("socket error")
        # Batch budget used up, a woken task to run first, or a ZMQ hiccup: come back
        # after other tasks ran.
        self._schedule_check()

    def _recv(self) -> list[Any]:
        """One whole message; ``zmq.Again`` if none is queued. Frames are received as
        ``zmq.Frame`` whatever ``copied`` says: its ``more`` is read in C, where asking
        ``ZMQ_RCVMORE`` through pyzmq converts the option to an enum every time."""
        sock = self.sock
        frame = _raw_recv(sock, _NOBLOCK, False)
        copied = self._copied
        frames: list[Any] = [frame.bytes if copied else frame]
        while frame.more:
            frame = _raw_recv(sock, 0, False)
            frames.append(frame.bytes if len(frames) < copied else frame)
        return frames

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._fd)
        self.sock.close(linger=0)
        for frames in self._outbox:
            discard(frames)  # never sent: what they lend is free again
        self._outbox.clear()
