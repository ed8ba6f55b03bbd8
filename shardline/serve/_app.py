"""The OpenAI-compatible HTTP API (FastAPI): errors in OpenAI's JSON shape, and never a
500 for something the client sent."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp

from .._errors import ShardlineError
from ..models import QueueFull
from . import _completions, _limits, _schema
from ._completions import Answer
from ._errors import Reject, error_response
from ._gate import CLIENT_GONE, Gate
from ._json import embeddings_json, parse
from ._metrics import ServeMetrics
from ._service import INLINE_CHARS, CompletionService, EmbeddingService, InputError, Unavailable

Service = EmbeddingService | CompletionService

__all__ = ["create_app"]

S = TypeVar("S", EmbeddingService, CompletionService)
T = TypeVar("T")

log = logging.getLogger("shardline.serve")

MAX_INPUTS = 2048  # per embeddings request, as OpenAI's API


def create_app(services: dict[str, Service], metrics: ServeMetrics, *,
               api_key: str | None = None, health_timeout: float = 5.0,
               max_body_bytes: int = _limits.MAX_BODY_BYTES,
               body_timeout: float = _limits.BODY_TIMEOUT,
               threads: int | None = None) -> ASGIApp:
    """The ASGI app serving ``services`` (model name -> service). Bodies over
    ``max_body_bytes`` get 413, bodies not all there ``body_timeout`` seconds after the
    request began get 408; big bodies and answers are parsed and encoded on up to
    ``threads`` worker threads (default: one per CPU)."""
    app = FastAPI(title="shardline", docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json")
    cpu = anyio.CapacityLimiter(threads or os.cpu_count() or 2)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> Response:
        log.error("request to %s failed", request.url.path, exc_info=exc)
        return error_response(500, "internal error", kind="server_error")

    @app.exception_handler(Reject)
    async def rejected(request: Request, exc: Reject) -> Response:
        return error_response(exc.status, exc.message, exc.kind, exc.code, exc.param,
                              exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return error_response(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(ClientDisconnect)
    async def client_left(request: Request, exc: ClientDisconnect) -> Response:
        # Not an error of ours: nobody is there to read this, and Gate counts it as such.
        return Response(status_code=CLIENT_GONE)

    async def off_loop(encode: Callable[[T], list[int]], text: T, size: int) -> list[int]:
        """A long text is tokenized (and a chat template rendered) on a worker thread."""
        if size <= INLINE_CHARS:
            return encode(text)
        return await anyio.to_thread.run_sync(encode, text, limiter=cpu)

    async def body_of(request: Request) -> dict[str, Any]:
        body = await parse(await request.body(), cpu)
        if not isinstance(body, dict):
            raise Reject(400, "the body must be a JSON object")
        return body

    @app.get("/v1/models", **_schema.described("models", errors=(401,)))
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": s.created, "owned_by": "shardline"}
            for name, s in services.items()]}

    @app.post("/v1/embeddings", **_schema.described(
        "embeddings", _schema.EmbeddingRequest, (400, 401, 404, 408, 413, 429, 503)))
    async def embeddings(request: Request) -> Response:
        body = await body_of(request)
        service = _service(services, body, EmbeddingService)
        texts = _texts(body.get("input"))
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            raise Reject(400, "encoding_format must be 'float' or 'base64'",
                         param="encoding_format")
        try:
            rows = await service.tokenize(texts)
        except InputError as exc:
            raise Reject(400, str(exc), param="input", code=exc.code) from None
        try:
            vectors = await service.embed(rows)
        except ShardlineError as exc:
            raise _model_error(exc, service) from None
        tokens = sum(map(len, rows))
        return Response(await embeddings_json(vectors, encoding, service.name, tokens, cpu),
                        media_type="application/json")

    @app.post("/v1/completions", **_schema.described(
        "completions", _schema.CompletionRequest, (400, 401, 404, 408, 413, 429, 503)))
    async def completions(request: Request) -> dict[str, Any] | Response:
        body = await body_of(request)
        service = _service(services, body, CompletionService)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise Reject(400, "'prompt' must be a string (one prompt per request)",
                         param="prompt")
        params = _completions.sampling(body, chat=False)
        try:
            ids = await off_loop(service.encode, prompt, len(prompt))
            budget = service.budget(ids, params.max_tokens, 16, "prompt")
        except InputError as exc:
            raise Reject(400, str(exc), param=exc.param or "prompt", code=exc.code) from None
        return await _complete(service, ids, budget, params,
                               Answer(service.name, False, len(ids)))

    @app.post("/v1/chat/completions", **_schema.described(
        "chat", _schema.ChatRequest, (400, 401, 404, 408, 413, 429, 503)))
    async def chat(request: Request) -> dict[str, Any] | Response:
        body = await body_of(request)
        service = _service(services, body, CompletionService)
        conversation = _completions.messages(body)
        params = _completions.sampling(body, chat=True)
        try:
            ids = await off_loop(service.encode_chat, conversation,
                                 sum(len(m["content"]) for m in conversation))
            budget = service.budget(ids, params.max_tokens, None, "messages")
        except InputError as exc:
            raise Reject(400, str(exc), param=exc.param or "messages",
                         code=exc.code) from None
        return await _complete(service, ids, budget, params,
                               Answer(service.name, True, len(ids)))

    health_doc = _schema.described("health")
    health_doc["responses"][503] = {"model": _schema.Health,
                                    "description": "a stage is dead or does not answer, "
                                    "or is being rebuilt (with Retry-After)"}

    @app.get("/healthz", **health_doc)
    async def healthz() -> Response:
        for name, service in services.items():
            try:
                await service.health(health_timeout)
            except (ShardlineError, TimeoutError) as exc:
                return JSONResponse({"status": "unavailable", "model": name,
                                     "error": f"{type(exc).__name__}: {exc}"},
                                    status_code=503, headers=_retry(service, exc))
        return JSONResponse({"status": "ok", "models": list(services)})

    @app.get("/trace", response_class=Response,
             responses={200: {"content": {"application/json": {}},
                              "description": "every recovery as a span, in Chrome "
                              "trace-event JSON (opens in Perfetto)"}})
    async def trace() -> Response:
        events: list[dict[str, Any]] = []
        for service in services.values():
            events.extend(service.recovery.chrome()["traceEvents"])
        return JSONResponse({"traceEvents": events, "displayTimeUnit": "ms"})

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {CONTENT_TYPE_LATEST: {}},
                              "description": "Prometheus text exposition"}})
    async def prometheus() -> Response:
        return Response(await metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.openapi()  # built now, not on the event loop while requests wait
    return Gate(app, metrics, api_key=api_key, max_body_bytes=max_body_bytes,
                body_timeout=body_timeout)


def _model_error(exc: ShardlineError, service: Service) -> Reject:
    """A full queue is 429 (retry later); anything else from the model side is 503, with
    ``Retry-After``: a worker is being replaced, or something failed."""
    if isinstance(exc, QueueFull):
        return Reject(429, f"server busy: {exc}; retry later", kind="rate_limit_error")
    return Reject(503, f"the model is unavailable: {exc}", kind="server_error",
                  headers=_retry(service, exc))


def _retry(service: Service, exc: BaseException) -> dict[str, str]:
    seconds = exc.retry_after if isinstance(exc, Unavailable) else \
        service.recovery.retry_after()
    return {"Retry-After": str(seconds)}


async def _complete(service: CompletionService, ids: list[int], budget: int,
                    params: _completions.Sampling, answer: Answer) -> dict[str, Any] | Response:
    pieces = service.complete(ids, budget, temperature=params.temperature,
                              top_p=params.top_p, seed=params.seed, stop=params.stop)
    try:  # the first piece before answering: a dead pipeline is a 503, not a stream
        first = await anext(pieces)
    except ShardlineError as exc:
        raise _model_error(exc, service) from None
    if params.stream:
        return StreamingResponse(
            _completions.stream_events(answer, first, pieces, params.include_usage),
            media_type="text/event-stream")
    text, reason, tokens = first
    try:
        async for piece in pieces:
            text, reason, tokens = text + piece.text, piece.finish_reason, piece.tokens
    except ShardlineError as exc:
        raise _model_error(exc, service) from None
    return answer.whole(text, reason, tokens)


def _service(services: dict[str, Service], body: dict[str, Any], kind: type[S]) -> S:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise Reject(400, "'model' is required (a string)", param="model")
    service = services.get(model)
    if service is None:
        raise Reject(404, f"The model '{model}' does not exist; this server has "
                     f"{sorted(services)}", code="model_not_found", param="model")
    if not isinstance(service, kind):
        raise Reject(400, f"the model '{model}' serves {service.kind}, not this endpoint",
                     param="model")
    return service


def _texts(value: Any) -> list[str]:
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts or \
            not all(isinstance(t, str) for t in texts):
        raise Reject(400, "'input' must be a string or a non-empty list of strings",
                     param="input")
    if len(texts) > MAX_INPUTS:
        raise Reject(400, f"at most {MAX_INPUTS} inputs per request", param="input")
    for i, text in enumerate(texts):
        if not text.isascii():
            _unicode(text, f"input[{i}]", "input")
    return texts


def _unicode(text: str, what: str, param: str) -> None:
    """JSON's ``\\ud800`` escape makes a Python string no UTF-8 can carry."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise Reject(400, f"{what} is not valid Unicode: {exc.reason} at character "
                     f"{exc.start}", param=param) from None
