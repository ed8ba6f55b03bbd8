"""A ZeroMQ socket driven straight from the event loop's reader callback.

``zmq.asyncio`` pays a future (and a poller round) per ``recv_multipart``; here the
socket's file descriptor is registered with the loop and every readable event drains
all queued messages in one go, handing each to a synchronous callback. That is what
lets 100 in-flight asks beat the plain pyzmq asyncio loop instead of trailing it.

ZeroMQ's FD is edge-triggered and a send can swallow the edge of a pending receive,
so ``ZMQ_EVENTS`` is re-checked after every batch and right after each send (a
callback is scheduled only if that finds a message waiting). Messages are received
while ``ZMQ_EVENTS`` says one is there, never until ``EAGAIN``: a ``zmq.Again`` costs
more (the exception object and its errno lookups) than the message itself.
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
_EVENTS, _RCVMORE = int(zmq.EVENTS), int(zmq.RCVMORE)
_POLLIN, _POLLOUT, _NOBLOCK = int(zmq.POLLIN), int(zmq.POLLOUT), int(zmq.NOBLOCK)
_MORE = int(zmq.SNDMORE) | _NOBLOCK
# pyzmq's compiled send, without the Python layer of ``send_multipart`` and ``send``
# (routing ids, groups, argument checks): 3-4 us less per message on a small VM.
_raw_send = _RawSocket.send
_raw_recv = _RawSocket.recv
_raw_get = _RawSocket.get  # getsockopt, without turning the option into an enum


def send_frames(sock: zmq.Socket[Any], frames: list[Any]) -> None:
    """``sock.send_multipart(frames, NOBLOCK, copy=False)``, faster: raises
    ``zmq.Again`` before queuing anything when the socket is full (ZeroMQ takes a
    multipart message whole or not at all)."""
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        _raw_send(sock, frame, _MORE if i < last else _NOBLOCK, False)


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
        self._handling = False  # inside _on_event's loop: it re-checks after each message
        self._closed = False
        self._loop.add_reader(self._fd, self._on_event)
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
        if self._check_scheduled or self._handling:
            return  # a check is due anyway (the handler loop checks after each message)
        try:
            events: int = _raw_get(self.sock, _EVENTS)  # type: ignore[assignment]
        except zmq.ZMQError:
            events = _POLLIN  # let the callback find out what is wrong
        if events & _POLLIN or (self._outbox and events & _POLLOUT):
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
                send_frames(sock, outbox[0])
            except zmq.Again:
                return
            outbox.popleft()

    def _on_event(self) -> None:
        self._check_scheduled = False
        if self._closed:
            return
        sock = self.sock
        try:
            events: int = _raw_get(sock, _EVENTS)  # type: ignore[assignment]
            if events & _POLLOUT and self._outbox:
                self._flush()
            for _ in range(_BATCH):
                if not events & _POLLIN:
                    return
                frames = self._recv()
                if frames is None:
                    return
                self._handling = True
                try:
                    self._on_message(frames)
                except Exception:
                    log.exception("message handler raised; message dropped")
                finally:
                    self._handling = False
                if self._closed:
                    return
                events = _raw_get(sock, _EVENTS)  # type: ignore[assignment]
                if events & _POLLOUT and self._outbox:
                    self._flush()
        except zmq.ZMQError as exc:
            if self._closed or exc.errno == zmq.ENOTSOCK:
                return
            log.exception("socket error")
        # Batch budget used up (or a ZMQ hiccup): come back after other tasks ran.
        self._schedule_check()

    def _recv(self) -> list[Any] | None:
        sock = self.sock
        try:
            first = _raw_recv(sock, _NOBLOCK)
        except zmq.Again:
            return None
        frames: list[Any] = [first]
        copied = self._copied
        while _raw_get(sock, _RCVMORE):
            frames.append(_raw_recv(sock, 0, len(frames) < copied))
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
