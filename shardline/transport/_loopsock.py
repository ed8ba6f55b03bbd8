"""A ZeroMQ socket driven straight from the event loop's reader callback.

``zmq.asyncio`` pays a future (and a poller round) per ``recv_multipart``; here the
socket's file descriptor is registered with the loop and every readable event drains
all queued messages in one go, handing each to a synchronous callback. That is what
lets 100 in-flight asks beat the plain pyzmq asyncio loop instead of trailing it.

ZeroMQ's FD is edge-triggered and a send can swallow the edge of a pending receive,
so ``ZMQ_EVENTS`` is re-checked after every batch and after sends.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq

from ._codec import discard

__all__ = ["LoopSocket"]

log = logging.getLogger("shardline.transport")

# Messages handled per readable event before yielding to other tasks.
_BATCH = 512
# Plain ints: pyzmq's constants are enums, and enum arithmetic costs microseconds.
_EVENTS, _RCVMORE = int(zmq.EVENTS), int(zmq.RCVMORE)
_POLLIN, _POLLOUT, _NOBLOCK = int(zmq.POLLIN), int(zmq.POLLOUT), int(zmq.NOBLOCK)


class LoopSocket:
    """Owns one zmq socket; ``on_message(frames)`` runs for every message received.

    ``copied`` leading frames arrive as ``bytes`` (identity, header); the rest as
    ``zmq.Frame`` whose ``.buffer`` is a zero-copy view of the received data.
    """

    def __init__(self, sock: zmq.Socket[Any], on_message: Callable[[list[Any]], None], *,
                 copied: int) -> None:
        self.sock = sock
        self._on_message = on_message
        self._copied = copied
        self._loop = asyncio.get_running_loop()
        self._fd: int = sock.getsockopt(zmq.FD)  # type: ignore[assignment]
        self._outbox: deque[list[Any]] = deque()
        self._check_scheduled = False
        self._closed = False
        self._loop.add_reader(self._fd, self._on_event)
        self._schedule_check()  # anything that arrived before the reader was added

    def send(self, frames: list[Any]) -> None:
        """Queue ``frames`` for sending without blocking; order is preserved."""
        if self._closed:
            return
        if not self._outbox:
            try:
                self.sock.send_multipart(frames, _NOBLOCK, copy=False)
            except zmq.Again:
                self._outbox.append(frames)
        else:
            self._outbox.append(frames)
        self._schedule_check()

    def send_or_raise(self, frames: list[Any]) -> None:
        """Send now or raise (``zmq.Again`` when full): for callers that keep their own
        queues, such as one per client of a ROUTER."""
        if self._closed:
            return
        self.sock.send_multipart(frames, _NOBLOCK, copy=False)
        self._schedule_check()

    @property
    def backlog(self) -> int:
        """Messages waiting for the socket to accept them (peer slow or gone)."""
        return len(self._outbox)

    def _schedule_check(self) -> None:
        if not self._check_scheduled:
            self._check_scheduled = True
            self._loop.call_soon(self._on_event)

    def _flush(self) -> None:
        sock = self.sock
        outbox = self._outbox
        while outbox:
            try:
                sock.send_multipart(outbox[0], _NOBLOCK, copy=False)
            except zmq.Again:
                return
            outbox.popleft()

    def _on_event(self) -> None:
        self._check_scheduled = False
        if self._closed:
            return
        sock = self.sock
        try:
            events: int = sock.getsockopt(_EVENTS)  # type: ignore[assignment]
            if events & _POLLOUT and self._outbox:
                self._flush()
            if not events & _POLLIN:
                return
            for _ in range(_BATCH):
                frames = self._recv()
                if frames is None:
                    return
                try:
                    self._on_message(frames)
                except Exception:
                    log.exception("message handler raised; message dropped")
                if self._closed:
                    return
        except zmq.ZMQError as exc:
            if self._closed or exc.errno == zmq.ENOTSOCK:
                return
            log.exception("socket error")
        # Batch budget used up (or a ZMQ hiccup): come back after other tasks ran.
        self._schedule_check()

    def _recv(self) -> list[Any] | None:
        sock = self.sock
        try:
            first = sock.recv(_NOBLOCK)
        except zmq.Again:
            return None
        frames: list[Any] = [first]
        copied = self._copied
        while sock.getsockopt(_RCVMORE):
            if len(frames) < copied:
                frames.append(sock.recv())
            else:
                frames.append(sock.recv(copy=False))
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
