"""What every request passes before the API sees it: the API key, the body's size and
time limits, and the counts and latencies for /metrics."""

from __future__ import annotations

import hmac
import logging
import time

import anyio
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._errors import Reject, error_response
from ._metrics import ServeMetrics

__all__ = ["CLIENT_GONE", "Gate"]

log = logging.getLogger("shardline.serve")

CLIENT_GONE = 499
"""The status counted for a request whose client left before its answer (nginx's)."""


class Gate:
    """Pure ASGI (Starlette's ``BaseHTTPMiddleware`` costs a task and a stream per
    request). A body over ``max_body_bytes`` is a 413, by its ``Content-Length`` before
    any of it is read, or as soon as a chunked body passes the limit; a body that has not
    all arrived ``body_timeout`` seconds after the request began is a 408, and the
    connection is closed."""

    ENDPOINTS = ("/v1/embeddings", "/v1/completions", "/v1/chat/completions", "/v1/models",
                 "/healthz", "/metrics", "/trace", "/openapi.json")

    def __init__(self, app: ASGIApp, metrics: ServeMetrics, *, api_key: str | None,
                 max_body_bytes: int, body_timeout: float) -> None:
        self.app = app
        self.metrics = metrics
        self.expected = None if api_key is None else f"Bearer {api_key}".encode()
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        path = scope["path"]
        endpoint = path if path in self.ENDPOINTS else "other"
        exchange = _Exchange(receive, send, self.max_body_bytes, started + self.body_timeout)
        try:
            refused = self._refuse(scope, path)
            if refused is None:
                await self.app(scope, exchange.receive, exchange.send)
            else:
                await refused(scope, exchange.receive, exchange.send)
        finally:
            status = CLIENT_GONE if exchange.gone else exchange.status
            if exchange.gone:
                log.debug("the client of %s %s left before its answer", scope["method"], path)
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.monotonic() - started)

    def _refuse(self, scope: Scope, path: str) -> Response | None:
        """A 401 for a missing key, a 413 for a declared body over the limit."""
        given = b""
        length = 0
        waiting = False  # for "100 Continue" before it sends the body
        for name, value in scope["headers"]:
            if name == b"authorization":
                given = value
            elif name == b"content-length":
                length = int(value) if value.isdigit() else 0  # the parser checked it
            elif name == b"expect":
                waiting = value.lower() == b"100-continue"
        if self.expected is not None and (path.startswith("/v1/") or path == "/trace") and \
                not hmac.compare_digest(given, self.expected):
            return error_response(401, "Incorrect or missing API key: send "
                                  "'Authorization: Bearer KEY'.", code="invalid_api_key")
        if length > self.max_body_bytes:
            # Kept alive: the server reads and drops the body (up to a bound), so a client
            # that sends all of it before reading still gets this answer; but one waiting
            # to be asked for it will not send it, so the connection has no next request.
            return error_response(413, too_large(length, self.max_body_bytes),
                                  headers={"Connection": "close"} if waiting else None)
        return None


def too_large(size: int, limit: int, more: bool = False) -> str:
    return (f"the request body is {'over ' if more else ''}{size} bytes; this server takes "
            f"at most {limit} (shardline serve --max-body-bytes)")


class _Exchange:
    """One request's ``receive`` and ``send``, watched: bytes read against the limit,
    the body's deadline, the status sent, and whether the client went away first."""

    def __init__(self, receive: Receive, send: Send, limit: int, deadline: float) -> None:
        self._receive, self._send = receive, send
        self.limit, self.deadline = limit, deadline
        self.read = 0
        self.body_done = False
        self.status = 500  # until the app says otherwise
        self.answered = False
        self.gone = False

    async def receive(self) -> Message:
        if self.body_done:
            message = await self._receive()
        else:
            try:
                with anyio.fail_after(max(self.deadline - time.monotonic(), 0)):
                    message = await self._receive()
            except TimeoutError:
                raise Reject(408, "the request body did not arrive in time",
                             headers={"Connection": "close"}) from None
        if message["type"] == "http.request":
            self.read += len(message.get("body", b""))
            self.body_done = not message.get("more_body", False)
            if self.read > self.limit:
                raise Reject(413, too_large(self.limit, self.limit, more=True))
        elif message["type"] == "http.disconnect" and not self.answered:
            self.gone = True
        return message

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            if self.body_done and not self.gone:
                await self._notice_departure()
        elif message["type"] == "http.response.body" and not message.get("more_body"):
            self.answered = True
        await self._send(message)

    async def _notice_departure(self) -> None:
        """Whether the client left while the answer was being worked out: the server
        says so at once, else this read is cancelled before it waits (as Starlette's
        ``Request.is_disconnected``). Only once the body is read: it takes no data."""
        with anyio.CancelScope() as scope:
            scope.cancel()
            if (await self._receive())["type"] == "http.disconnect":
                self.gone = True
