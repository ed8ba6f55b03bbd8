"""Replies on their way to clients, bounded in bytes per client connection.

A ROUTER bounds each client's queue only in messages (the high-water mark), and
without ``ROUTER_MANDATORY`` drops what goes over it without a word. So a client that
sends many calls returning megabytes and never reads them grows the node by gigabytes.
Here every client connection (a route) gets:

- a *window* of bytes handed to ZeroMQ. Messages that carry bulk data, and one small
  message per MiB, are sent as tracked zero-copy frames, so ZeroMQ says when it has
  written them to the kernel (earlier messages on that route are gone by then too);
- a *backlog* above the window, in Python, that can be discarded;
- a *budget* (``max_bytes``) over both. A reply that would exceed it is answered with a
  ``ProtocolError`` that says so (one message is always let through, however large):
  the caller hears why, nothing vanishes. A client that is over its budget and reads
  nothing for ``stall_timeout`` seconds is dropped: its backlog is discarded, its
  later requests are ignored, and what sits in the window goes when it disconnects.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import anyio
import zmq

from ._loopsock import LoopSocket
from ._placement import discard, message_size

__all__ = ["Outgoing"]

log = logging.getLogger("shardline.transport")

# A frame this large is sent zero-copy anyway; tracking it costs an event, no copy.
_TRACK_MIN = 64 << 10
# Small messages: one tracked per this many bytes, so the window sees them leave.
_SAMPLE = 1 << 20
# A route with nothing queued that sent nothing for this long is forgotten.
_IDLE = 60.0
_EHOSTUNREACH = zmq.EHOSTUNREACH

# (route, request id or None, frames) -> the frames to send instead when over budget
Refusal = Callable[[int, int, int], list[Any]]


class _Client:
    """What is queued toward one client connection."""

    __slots__ = ("backlog", "backlog_bytes", "dropped", "last_send", "marks", "progress_at",
                 "refused", "released", "sent", "untracked")

    def __init__(self, now: float) -> None:
        self.sent = 0          # bytes handed to ZeroMQ, ever
        self.released = 0      # of those, bytes ZeroMQ is known to be done with
        self.untracked = 0     # bytes sent since the last tracked message
        self.marks: deque[tuple[Any, int]] = deque()  # (tracker, ``sent`` after it)
        self.backlog: deque[tuple[list[Any], int]] = deque()
        self.backlog_bytes = 0
        self.progress_at = now
        self.last_send = now
        self.refused = 0       # replies refused since the client last made progress
        self.dropped = False

    def release(self, now: float) -> None:
        marks = self.marks
        while marks and marks[0][0].done:
            self.released = marks.popleft()[1]
            self.progress_at = now
            self.refused = 0

    def pending(self) -> int:
        """Bytes up to the last tracked message that ZeroMQ has not written yet. The
        untracked ones after it (under ``_SAMPLE``) are never confirmed, so a message
        larger than the window waits only for these: waiting for all would be forever."""
        return self.sent - self.untracked - self.released

    def in_socket(self) -> int:
        """Bytes ZeroMQ still holds. Reads only: statistics may run on another thread
        (a Prometheus scrape), so nothing is popped here."""
        released = self.released
        for tracker, sent in list(self.marks):
            if not tracker.done:
                break
            released = sent
        return self.sent - released

    @property
    def queued(self) -> int:
        return self.sent - self.released + self.backlog_bytes


class Outgoing:
    """Per-client outgoing queues of one ROUTER (see the module docstring)."""

    def __init__(self, router: LoopSocket, refusal: Refusal, *, max_bytes: int,
                 stall_timeout: float) -> None:
        if max_bytes < 1:
            raise ValueError("max_queued_bytes must be >= 1")
        self._router = router
        self._refusal = refusal
        self.max_bytes = max_bytes
        self.window = min(max_bytes, 16 << 20)
        self.stall_timeout = stall_timeout
        self._clients: dict[bytes, _Client] = {}
        self._backlogged: set[bytes] = set()
        self._wake = anyio.Event()
        self.refused = 0
        self.dropped = 0

    # -- the reply path ------------------------------------------------------------

    def send(self, route: bytes, frames: list[Any], rid: int | None) -> None:
        """Queue ``frames`` (the answer to request ``rid``, if any) for ``route``."""
        client = self._clients.get(route)
        now = time.monotonic()
        if client is None:
            client = self._clients[route] = _Client(now)
        elif client.dropped:
            return
        n = len(frames[0]) if len(frames) == 1 else _size(frames)
        if client.marks:
            client.release(now)
        in_socket = client.sent - client.released
        if not client.backlog and (not client.pending() or in_socket + n <= self.window):
            if self._push(route, client, frames, n, now):
                return
        elif rid is not None and in_socket + client.backlog_bytes + n > self.max_bytes:
            discard(frames)
            frames = self._refusal(rid, n, in_socket + client.backlog_bytes)
            n = _size(frames)
            client.refused += 1
            self.refused += 1
        client.backlog.append((frames, n))
        client.backlog_bytes += n
        if route not in self._backlogged:
            self._backlogged.add(route)
            self._wake.set()

    def _push(self, route: bytes, client: _Client, frames: list[Any], n: int,
              now: float) -> bool:
        """Hand one message to ZeroMQ; False if its queue for ``route`` is full."""
        track = n >= _TRACK_MIN or client.untracked + n >= _SAMPLE
        parts = frames
        if track:
            last = zmq.Frame(frames[-1], copy=False, track=True)
            parts = [*frames[:-1], last]
        try:
            self._router.send_or_raise([route, *parts])
        except zmq.Again:
            return False  # at the high-water mark (in messages): wait in the backlog
        except zmq.ZMQError as exc:
            discard(frames)
            if exc.errno == _EHOSTUNREACH:
                self._forget(route)  # the client disconnected: nobody to answer
            else:  # the socket is closing: the node is shutting down
                log.debug("reply not sent: %s", exc)
            return True
        client.sent += n
        client.last_send = now
        if track:
            client.marks.append((last.tracker, client.sent))
            client.untracked = 0
        else:
            client.untracked += n
        return True

    def is_dropped(self, route: bytes) -> bool:
        client = self._clients.get(route)
        return client is not None and client.dropped

    # -- the backlog -----------------------------------------------------------------

    async def run(self, awake_since: Callable[[], float]) -> None:
        """Move backlogs into ZeroMQ as windows free up; drop clients that stall.

        Owned by the node's task group. Polls only while some client has a backlog,
        faster while data moves (ZeroMQ signals release on another thread, not here).
        """
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            delay = 0.001
            while self._backlogged:
                await anyio.sleep(delay)
                moved = self.flush(time.monotonic(), awake_since())
                delay = 0.001 if moved else min(delay * 2, 0.05)

    def flush(self, now: float, awake_since: float) -> bool:
        moved = False
        for route in list(self._backlogged):
            client = self._clients.get(route)
            if client is None:
                self._backlogged.discard(route)
                continue
            before = client.backlog_bytes
            client.release(now)
            backlog = client.backlog
            while backlog:
                frames, n = backlog[0]
                in_socket = client.sent - client.released
                if client.pending() and in_socket + n > self.window:
                    break
                if not self._push(route, client, frames, n, now):
                    break
                if route not in self._clients:
                    break  # gone while pushing
                backlog.popleft()
                client.backlog_bytes -= n
            if client.backlog_bytes != before:
                moved = True
            if not backlog:
                self._backlogged.discard(route)
            elif self._stalled(client, now, awake_since):
                self._drop(route, client, now)
        return moved

    def _stalled(self, client: _Client, now: float, awake_since: float) -> bool:
        """Over its budget (a reply was refused) and nothing read for stall_timeout,
        not counting a stall of this node's own loop."""
        return bool(client.refused) and not client.dropped and \
            now - max(client.progress_at, awake_since) > self.stall_timeout

    def _drop(self, route: bytes, client: _Client, now: float) -> None:
        log.warning("dropped a client that read nothing for %.1f s with %d bytes of replies "
                    "queued (max_queued_bytes=%d); its backlog is discarded",
                    now - client.progress_at, client.queued, self.max_bytes)
        client.dropped = True
        for frames, _ in client.backlog:
            discard(frames)
        client.backlog.clear()
        client.backlog_bytes = 0
        self._backlogged.discard(route)
        self.dropped += 1

    def _forget(self, route: bytes) -> None:
        client = self._clients.pop(route, None)
        self._backlogged.discard(route)
        if client is not None:
            for frames, _ in client.backlog:
                discard(frames)
            client.backlog.clear()

    def sweep(self, now: float, awake_since: float) -> None:
        """Drop clients that stalled over their budget; forget clients with nothing
        queued that were silent for a while. Runs with the heartbeats."""
        for route, client in list(self._clients.items()):
            if client.marks:
                client.release(now)
            if self._stalled(client, now, awake_since):
                self._drop(route, client, now)
            elif not client.marks and not client.backlog and now - client.last_send > _IDLE:
                del self._clients[route]

    def statistics(self) -> dict[str, int]:
        in_socket = backlog = 0
        for client in list(self._clients.values()):
            in_socket += client.in_socket()
            backlog += client.backlog_bytes
        return {
            "clients": len(self._clients),
            "queued_bytes": in_socket + backlog,
            "in_socket_bytes": in_socket,
            "backlog_bytes": backlog,
            "max_queued_bytes": self.max_bytes,
            "replies_refused": self.refused,
            "clients_dropped": self.dropped,
        }


def _size(frames: list[Any]) -> int:
    # Shared memory counts: what a slow client holds there is memory too.
    return message_size(frames)
