"""``/v1/completions`` and ``/v1/chat/completions`` as OpenAI shapes them: the sampling
fields of a request, checked, and the answer, whole or as server-sent events."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any, TypeVar

from .._errors import ShardlineError
from ._errors import Reject
from ._service import Piece

__all__ = ["Answer", "Sampling", "messages", "number", "sampling", "stream_events"]

N = TypeVar("N", int, float)

SEEDS = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed takes
ROLES = ("system", "developer", "user", "assistant", "tool")
UNSUPPORTED = ("tools", "functions", "tool_choice", "function_call", "logprobs",
               "top_logprobs", "echo", "suffix", "logit_bias")


@dataclass(frozen=True)
class Sampling:
    max_tokens: int | None
    """``None``: not given (the endpoint's default applies)."""
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    """``stream_options.include_usage``: a last event with the token counts."""


def number(body: dict[str, Any], name: str, default: N | None, kind: type[N], low: float,
           high: float) -> N | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (kind is int and not isinstance(value, int)) or not low <= value <= high:
        raise Reject(400, f"'{name}' must be {'an integer' if kind is int else 'a number'} "
                     f"in [{low}, {high}]", param=name)
    return kind(value)


def sampling(body: dict[str, Any], chat: bool) -> Sampling:
    for name in UNSUPPORTED:
        # echo/suffix/logit_bias as their "off" values are what some clients always send
        if body.get(name) not in (None, False, {}, [], ""):
            raise Reject(400, f"'{name}' is not supported by this server", param=name)
    max_tokens = number(body, "max_tokens", None, int, 1, 1 << 20)
    if chat and max_tokens is None:  # the newer name of the same thing
        max_tokens = number(body, "max_completion_tokens", None, int, 1, 1 << 20)
    temperature = number(body, "temperature", 1.0, float, 0.0, 2.0)
    top_p = number(body, "top_p", 1.0, float, 1e-9, 1.0)
    assert temperature is not None and top_p is not None
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or
                             not SEEDS[0] <= seed <= SEEDS[1]):
        raise Reject(400, f"'seed' must be an integer in [{SEEDS[0]}, {SEEDS[1]}]",
                     param="seed")
    if body.get("n", 1) not in (1, None) or body.get("best_of", 1) not in (1, None):
        raise Reject(400, "only n = 1 is supported", param="n")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise Reject(400, "'stream' must be true or false", param="stream")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not stream):
        raise Reject(400, "'stream_options' must be an object, and only with stream: true",
                     param="stream_options")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or \
            not all(isinstance(x, str) for x in stop):
        raise Reject(400, "'stop' must be a string or up to 4 strings", param="stop")
    return Sampling(max_tokens, temperature, top_p, seed, stop, bool(stream),
                    bool((options or {}).get("include_usage")))


def messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The conversation as the chat template reads it: ``role`` and ``content`` (a list
    of text parts is joined into one string, as vLLM does)."""
    given = body.get("messages")
    if not isinstance(given, list) or not given:
        raise Reject(400, "'messages' must be a non-empty list of {role, content}",
                     param="messages")
    out = []
    for i, message in enumerate(given):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise Reject(400, f"{where} must be an object", param="messages")
        role = message.get("role")
        if role not in ROLES:
            raise Reject(400, f"{where}.role must be one of {', '.join(ROLES)}",
                         param="messages")
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or \
                        not isinstance(part.get("text"), str):
                    raise Reject(400, f"{where}.content: only text parts "
                                 '({"type": "text", "text": ...}) are supported',
                                 param="messages")
                texts.append(part["text"])
            content = "\n".join(texts)
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise Reject(400, f"{where}.content must be a string or a list of text parts",
                         param="messages")
        kept: dict[str, Any] = {"role": role, "content": content}
        if isinstance(message.get("name"), str):
            kept["name"] = message["name"]
        out.append(kept)
    return out


class Answer:
    """One request's answer in OpenAI's shape: a completion (``chat=False``: choices
    carry ``text``) or a chat completion (choices carry a ``message``, stream chunks a
    ``delta``)."""

    def __init__(self, model: str, chat: bool, prompt_tokens: int) -> None:
        self.chat = chat
        self.prompt_tokens = prompt_tokens
        prefix, kind = ("chatcmpl", "chat.completion") if chat else ("cmpl",
                                                                     "text_completion")
        self.head = {"id": f"{prefix}-{secrets.token_hex(12)}", "object": kind,
                     "created": int(time.time()), "model": model}

    def usage(self, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def whole(self, text: str, reason: str | None, tokens: int) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": reason}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {**self.head, "choices": [choice], "usage": self.usage(tokens)}

    def chunk(self, text: str, reason: str | None, first: bool = False) -> bytes:
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": reason}
        if not self.chat:
            choice["text"] = text
            return _event({**self.head, "choices": [choice]})
        out = b""
        if first:  # the role comes first, on its own, as OpenAI sends it
            out = _event({**self.head, "object": "chat.completion.chunk", "choices": [
                {"index": 0, "delta": {"role": "assistant", "content": ""},
                 "logprobs": None, "finish_reason": None}]})
        if text:
            out += _event({**self.head, "object": "chat.completion.chunk", "choices": [
                {**choice, "delta": {"content": text}, "finish_reason": None}]})
        if reason is not None:
            out += _event({**self.head, "object": "chat.completion.chunk",
                           "choices": [{**choice, "delta": {}}]})
        return out

    def usage_chunk(self, tokens: int) -> bytes:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return _event({**self.head, "object": kind, "choices": [],
                       "usage": self.usage(tokens)})


def _event(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()


async def stream_events(answer: Answer, first: Piece,
                        pieces: AsyncGenerator[Piece, None],
                        include_usage: bool) -> AsyncIterator[bytes]:
    """Server-sent events as OpenAI streams them, ending with ``data: [DONE]``. A client
    that goes away closes ``pieces``, which frees the request's caches on the stages."""
    tokens = first.tokens
    try:
        yield answer.chunk(first.text, first.finish_reason, first=True)
        async for piece in pieces:
            tokens = piece.tokens
            yield answer.chunk(piece.text, piece.finish_reason)
    except ShardlineError as exc:  # the status line is gone: say it in the stream
        error = {"error": {"message": f"the model is unavailable: {exc}",
                           "type": "server_error", "param": None, "code": None}}
        yield _event(error)
    finally:
        await pieces.aclose()
    if include_usage:
        yield answer.usage_chunk(tokens)
    yield b"data: [DONE]\n\n"
