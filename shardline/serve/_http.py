"""uvicorn's HTTP/1.1 protocol with the deadlines it lacks.

uvicorn closes a connection left idle after a response (its keep-alive timeout), but
waits forever for a first byte, for the end of a request's head, and for the rest of a
body the app has already answered: 200 silent connections or 50 half-sent heads hold
their sockets and buffers for good. This protocol gives each of those a deadline, and
caps a request's head and what it drops of an answered body. (The body an app reads has
its limits in ``Gate``: there the app can still answer 408 or 413.)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ._errors import error_body

__all__ = ["GuardedProtocol"]

log = logging.getLogger("shardline.serve")


class GuardedProtocol(HttpToolsProtocol):
    """``uvicorn.Config(http=GuardedProtocol.configure(...))``. A connection is closed
    when the head of a request is not complete ``header_timeout`` seconds after the
    connection opened or the request's first byte came (408 if some of it came), when a
    head passes ``max_header_bytes`` (431), or when the rest of an answered body takes
    over ``drain_timeout`` seconds or ``max_drain_bytes`` bytes. ``on_close(reason)`` is
    told each time."""

    header_timeout = 10.0
    drain_timeout = 30.0
    max_header_bytes = 64 * 1024
    max_drain_bytes = 16 * 1024 * 1024
    on_close: Callable[[str], None] = staticmethod(lambda reason: None)

    @classmethod
    def configure(cls, *, header_timeout: float, drain_timeout: float,
                  max_header_bytes: int = 64 * 1024, max_drain_bytes: int = 16 * 1024 * 1024,
                  on_close: Callable[[str], None] | None = None) -> type[GuardedProtocol]:
        """A subclass with these limits (uvicorn makes the protocol from a class)."""
        limits: dict[str, Any] = {
            "header_timeout": header_timeout, "drain_timeout": drain_timeout,
            "max_header_bytes": max_header_bytes, "max_drain_bytes": max_drain_bytes}
        if on_close is not None:
            limits["on_close"] = staticmethod(on_close)
        return cast("type[GuardedProtocol]", type(cls.__name__, (cls,), limits))

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None
        self._head: int | None = 0  # bytes of the current request's head; None past it
        self._dropped = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.header_timeout, self._head_late)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._head is not None:
            self._head += len(data)
        super().data_received(data)
        if self._head is not None and self._head > self.max_header_bytes:
            self._end("header_too_large", 431, "the request head is over "
                      f"{self.max_header_bytes} bytes")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._timer is None:  # else the connection's first deadline still runs
            self._arm(self.header_timeout, self._head_late)

    def on_headers_complete(self) -> None:
        self._disarm()
        self._head = None
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self.cycle.response_complete:  # answered already: drop it, up to a bound
            self._dropped += len(body)
            if self._dropped > self.max_drain_bytes:
                self._end("drain_too_large")
            return
        super().on_body(body)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._disarm()
        self._head = 0

    def on_response_complete(self) -> None:
        super().on_response_complete()
        cycle = self.cycle
        if cycle.response_complete and cycle.more_body and not self.transport.is_closing():
            self._dropped = 0
            self._arm(self.drain_timeout, self._drain_late)

    def _head_late(self) -> None:
        self._timer = None
        if self._head:
            self._end("header_timeout", 408, "the request head did not arrive in time")
        else:  # not a byte: nobody to answer
            self._end("header_timeout")

    def _drain_late(self) -> None:
        self._timer = None
        self._end("drain_timeout")

    def _end(self, reason: str, status: int | None = None, message: str = "") -> None:
        """Close the connection, answering ``status`` first if the client is owed an
        answer; a response still being made for an earlier request goes out first."""
        if self.transport.is_closing():
            return
        log.debug("closing an HTTP connection: %s", reason)
        self.on_close(reason)
        self._disarm()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.keep_alive = False  # uvicorn closes once that response is out
            self.flow.pause_reading()
            return
        if status is not None:
            body = error_body(message)
            self.transport.write(
                b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                % (status, _REASONS[status], len(body), body))
        self.transport.close()

    def _arm(self, delay: float, callback: Callable[[], None]) -> None:
        self._disarm()
        self._timer = self.loop.call_later(delay, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}
