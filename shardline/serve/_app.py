"""The OpenAI-compatible HTTP API (FastAPI): errors in OpenAI's JSON shape, and never a
500 for something the client sent."""

from __future__ import annotations

import base64
import hmac
import json
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._errors import ShardlineError
from ..models import QueueFull
from ._metrics import ServeMetrics
from ._service import EmbeddingService, InputError

__all__ = ["create_app"]

log = logging.getLogger("shardline.serve")

MAX_INPUTS = 2048  # per embeddings request, as OpenAI's API


class _Reject(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = (
            status, message, kind, code, param)


def _error(status: int, message: str, kind: str = "invalid_request_error",
           code: str | None = None, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param,
                                   "code": code}}, status_code=status)


def create_app(services: dict[str, EmbeddingService], metrics: ServeMetrics, *,
               api_key: str | None = None, health_timeout: float = 5.0) -> ASGIApp:
    """The ASGI app serving ``services`` (model name -> service)."""
    app = FastAPI(title="shardline", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> Response:
        log.error("request to %s failed", request.url.path, exc_info=exc)
        return _error(500, "internal error", kind="server_error")

    @app.exception_handler(_Reject)
    async def rejected(request: Request, exc: _Reject) -> Response:
        return _error(exc.status, exc.message, exc.kind, exc.code, exc.param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return _error(exc.status_code, str(exc.detail), code=None)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": s.created, "owned_by": "shardline"}
            for name, s in services.items()]}

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> dict[str, Any]:
        body = await _body(request)
        service = _service(services, body)
        texts = _texts(body.get("input"))
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            raise _Reject(400, "encoding_format must be 'float' or 'base64'",
                          param="encoding_format")
        try:
            tokens = service.check(texts)
        except InputError as exc:
            raise _Reject(400, str(exc), param="input", code="context_length_exceeded") \
                from None
        try:
            vectors = await service.embed(texts)
        except QueueFull as exc:
            raise _Reject(429, f"server busy: {exc}; retry later",
                          kind="rate_limit_error") from None
        except ShardlineError as exc:
            raise _Reject(503, f"the model is unavailable: {exc}",
                          kind="server_error") from None
        data = [{"object": "embedding", "index": i,
                 "embedding": v.tolist() if encoding == "float" else
                 base64.b64encode(v.numpy().astype("<f4").tobytes()).decode()}
                for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": service.name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @app.get("/healthz")
    async def healthz() -> Response:
        for name, service in services.items():
            try:
                await service.health(health_timeout)
            except (ShardlineError, TimeoutError) as exc:
                return JSONResponse({"status": "unavailable", "model": name,
                                     "error": f"{type(exc).__name__}: {exc}"},
                                    status_code=503)
        return JSONResponse({"status": "ok", "models": list(services)})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(await metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return _Gate(app, metrics, api_key)


class _Gate:
    """Pure ASGI (Starlette's ``BaseHTTPMiddleware`` costs a task and a stream per
    request): the API key check, and request counts and latencies for /metrics."""

    ENDPOINTS = ("/v1/embeddings", "/v1/completions", "/v1/models", "/healthz", "/metrics")

    def __init__(self, app: FastAPI, metrics: ServeMetrics, api_key: str | None) -> None:
        self.app = app
        self.metrics = metrics
        self.expected = None if api_key is None else f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        path = scope["path"]
        endpoint = path if path in self.ENDPOINTS else "other"
        status = [500]

        async def send_and_count(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.expected is not None and path.startswith("/v1/"):
                given = dict(scope["headers"]).get(b"authorization", b"")
                if not hmac.compare_digest(given, self.expected):
                    response = _error(
                        401, "Incorrect or missing API key: send 'Authorization: Bearer KEY'.",
                        code="invalid_api_key")
                    await response(scope, receive, send_and_count)
                    return
            await self.app(scope, receive, send_and_count)
        finally:
            self.metrics.requests.labels(endpoint, str(status[0])).inc()
            self.metrics.latency.labels(endpoint).observe(time.monotonic() - started)


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _Reject(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise _Reject(400, "the body must be a JSON object")
    return body


def _service(services: dict[str, EmbeddingService], body: dict[str, Any]) -> EmbeddingService:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _Reject(400, "'model' is required (a string)", param="model")
    service = services.get(model)
    if service is None:
        raise _Reject(404, f"The model '{model}' does not exist; this server has "
                      f"{sorted(services)}", code="model_not_found", param="model")
    return service


def _texts(value: Any) -> list[str]:
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts or \
            not all(isinstance(t, str) for t in texts):
        raise _Reject(400, "'input' must be a string or a non-empty list of strings",
                      param="input")
    if len(texts) > MAX_INPUTS:
        raise _Reject(400, f"at most {MAX_INPUTS} inputs per request", param="input")
    return texts
