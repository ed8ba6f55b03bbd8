"""The OpenAI-compatible HTTP API (FastAPI): errors in OpenAI's JSON shape, and never a
500 for something the client sent."""

from __future__ import annotations

import base64
import hmac
import json
import logging
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._errors import ShardlineError
from ..models import QueueFull
from ._metrics import ServeMetrics
from ._service import CompletionService, EmbeddingService, InputError

Service = EmbeddingService | CompletionService

__all__ = ["create_app"]

S = TypeVar("S", EmbeddingService, CompletionService)
N = TypeVar("N", int, float)

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


def create_app(services: dict[str, Service], metrics: ServeMetrics, *,
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
        service = _service(services, body, EmbeddingService)
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
        except ShardlineError as exc:
            raise _model_error(exc) from None
        data = [{"object": "embedding", "index": i,
                 "embedding": v.tolist() if encoding == "float" else
                 base64.b64encode(v.numpy().astype("<f4").tobytes()).decode()}
                for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": service.name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> dict[str, Any] | Response:
        body = await _body(request)
        service = _service(services, body, CompletionService)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise _Reject(400, "'prompt' must be a string (one prompt per request)",
                          param="prompt")
        max_tokens = _number(body, "max_tokens", 16, int, 1, 1 << 20)
        temperature = _number(body, "temperature", 1.0, float, 0.0, 2.0)
        top_p = _number(body, "top_p", 1.0, float, 1e-9, 1.0)
        seed = body.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise _Reject(400, "'seed' must be an integer", param="seed")
        if body.get("n", 1) != 1 or body.get("best_of", 1) != 1:
            raise _Reject(400, "only n = 1 is supported", param="n")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > 4 or \
                not all(isinstance(x, str) for x in stop):
            raise _Reject(400, "'stop' must be a string or up to 4 strings", param="stop")
        try:
            ids = service.encode(prompt)
        except InputError as exc:
            raise _Reject(400, str(exc), param="prompt",
                          code="context_length_exceeded") from None
        pieces = service.complete(ids, max_tokens, temperature=temperature, top_p=top_p,
                                  seed=seed, stop=stop)
        head = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion",
                "created": int(time.time()), "model": service.name}
        try:  # the first piece before answering: a dead pipeline is a 503, not a stream
            first = await anext(pieces)
        except ShardlineError as exc:
            raise _model_error(exc) from None
        if body.get("stream"):
            return StreamingResponse(_events(head, first, pieces),
                                     media_type="text/event-stream")
        text, reason = first
        try:
            async for piece, why in pieces:
                text, reason = text + piece, why
        except ShardlineError as exc:
            raise _model_error(exc) from None
        completion = len(text.encode("utf-8"))
        return {**head, "choices": [{"text": text, "index": 0, "logprobs": None,
                                     "finish_reason": reason}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": completion,
                          "total_tokens": len(ids) + completion}}

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


def _model_error(exc: ShardlineError) -> _Reject:
    """A full queue is 429 (retry later); anything else from the model side is 503."""
    if isinstance(exc, QueueFull):
        return _Reject(429, f"server busy: {exc}; retry later", kind="rate_limit_error")
    return _Reject(503, f"the model is unavailable: {exc}", kind="server_error")


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _Reject(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise _Reject(400, "the body must be a JSON object")
    return body


def _service(services: dict[str, Service], body: dict[str, Any], kind: type[S]) -> S:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _Reject(400, "'model' is required (a string)", param="model")
    service = services.get(model)
    if service is None:
        raise _Reject(404, f"The model '{model}' does not exist; this server has "
                      f"{sorted(services)}", code="model_not_found", param="model")
    if not isinstance(service, kind):
        raise _Reject(400, f"the model '{model}' serves {service.kind}, not this endpoint",
                      param="model")
    return service


def _number(body: dict[str, Any], name: str, default: float, kind: type[N], low: float,
            high: float) -> N:
    value = body.get(name, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (kind is int and not isinstance(value, int)) or not low <= value <= high:
        raise _Reject(400, f"'{name}' must be {'an integer' if kind is int else 'a number'} "
                      f"in [{low}, {high}]", param=name)
    return kind(value)


async def _events(head: dict[str, Any], first: tuple[str, str | None],
                  pieces: AsyncGenerator[tuple[str, str | None], None]
                  ) -> AsyncIterator[bytes]:
    """Server-sent events as OpenAI streams them, ending with ``data: [DONE]``. A client
    that goes away closes ``pieces``, which frees the request's caches on the stages."""
    def event(text: str, reason: str | None) -> bytes:
        chunk = {**head, "choices": [{"text": text, "index": 0, "logprobs": None,
                                      "finish_reason": reason}]}
        return f"data: {json.dumps(chunk)}\n\n".encode()

    try:
        yield event(*first)
        async for piece, reason in pieces:
            yield event(piece, reason)
    except ShardlineError as exc:  # the status line is gone: say it in the stream
        error = {"error": {"message": f"the model is unavailable: {exc}",
                           "type": "server_error", "param": None, "code": None}}
        yield f"data: {json.dumps(error)}\n\n".encode()
    finally:
        await pieces.aclose()
    yield b"data: [DONE]\n\n"


def _texts(value: Any) -> list[str]:
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts or \
            not all(isinstance(t, str) for t in texts):
        raise _Reject(400, "'input' must be a string or a non-empty list of strings",
                      param="input")
    if len(texts) > MAX_INPUTS:
        raise _Reject(400, f"at most {MAX_INPUTS} inputs per request", param="input")
    return texts
