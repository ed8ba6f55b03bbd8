"""JSON in and out of the HTTP API without stalling the event loop.

``json.loads`` and ``json.dumps`` hold the GIL for the whole call, so handing one big call
to a worker thread frees nothing: 1 MiB of ``[],[],...`` takes ~0.1 s to parse, and the
event loop (heartbeats to the workers included) would wait that long. So small bodies
parse inline with the C parser, and big ones on a worker thread with the standard
library's Python scanner (still C for each string), which lets the GIL go between
values; big responses are encoded on a worker thread one vector at a time.
"""

from __future__ import annotations

import base64
import json
import json.scanner
from typing import Any

import anyio
import torch

from ._errors import Reject

__all__ = ["INLINE_BYTES", "embeddings_json", "parse"]

INLINE_BYTES = 64 * 1024
"""Bodies up to this size parse on the event loop (a few ms at worst)."""

MAX_CONTAINERS = 4096
"""Arrays and objects a big body may hold (a valid request has a handful). Every one is
tracked by the garbage collector, whose passes over hundreds of thousands of them hold
the GIL for ~0.1 s at a time."""

INLINE_FLOATS = 8192
"""Responses with up to this many floats (as JSON numbers) are encoded on the loop."""


_py_make_scanner: Any = getattr(json.scanner, "py_make_scanner")  # noqa: B009 (untyped)


class _YieldingDecoder(json.JSONDecoder):
    """The pure-Python scanner: slower, but it runs bytecode between values, so the
    interpreter can hand the GIL to the event loop's thread while it parses; and it
    stops after ``MAX_CONTAINERS`` arrays and objects."""

    parse_array: Any
    parse_object: Any

    def __init__(self) -> None:
        super().__init__()
        left = [MAX_CONTAINERS]

        def counted(parse: Any) -> Any:
            def parse_counted(*args: Any, **kwargs: Any) -> Any:
                left[0] -= 1
                if left[0] < 0:
                    raise Reject(400, f"the body holds more than {MAX_CONTAINERS} JSON "
                                 "arrays and objects")
                return parse(*args, **kwargs)
            return parse_counted

        self.parse_array = counted(self.parse_array)
        self.parse_object = counted(self.parse_object)
        self.scan_once = _py_make_scanner(self)


_FAST = json.JSONDecoder()


async def parse(raw: bytes, limiter: anyio.CapacityLimiter) -> Any:
    """The JSON value of a request body; ``Reject(400)`` if it is not UTF-8 JSON or is
    nested too deeply."""
    if len(raw) <= INLINE_BYTES:
        return _decode(raw, _FAST)
    # a decoder per call: the scanner's key memo is per decoder, and threads overlap
    return await anyio.to_thread.run_sync(_decode, raw, _YieldingDecoder(), limiter=limiter)


def _decode(raw: bytes, decoder: json.JSONDecoder) -> Any:
    try:
        return decoder.decode(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise Reject(400, f"the body is not UTF-8: {exc}") from None
    except RecursionError:
        raise Reject(400, "the body is not valid JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and integers over 4300 digits
        raise Reject(400, f"the body is not valid JSON: {exc}") from None


async def embeddings_json(vectors: list[torch.Tensor], encoding: str, model: str,
                          tokens: int, limiter: anyio.CapacityLimiter) -> bytes:
    """The ``/v1/embeddings`` response body: vectors as JSON numbers (``float``) or as
    base64 of little-endian float32 (``base64``)."""
    cost = sum(v.numel() for v in vectors) // (1 if encoding == "float" else 32)
    if cost <= INLINE_FLOATS:
        return _embeddings_json(vectors, encoding, model, tokens)
    return await anyio.to_thread.run_sync(_embeddings_json, vectors, encoding, model,
                                          tokens, limiter=limiter)


def _embeddings_json(vectors: list[torch.Tensor], encoding: str, model: str,
                     tokens: int) -> bytes:
    items = []
    for i, v in enumerate(vectors):  # one short C call per vector: the GIL can go between
        if encoding == "float":
            embedding = json.dumps(v.tolist(), allow_nan=False, separators=(",", ":"))
        else:
            embedding = f'"{base64.b64encode(v.numpy().astype("<f4").tobytes()).decode()}"'
        items.append(f'{{"object":"embedding","index":{i},"embedding":{embedding}}}')
    return (f'{{"object":"list","data":[{",".join(items)}],"model":{json.dumps(model)},'
            f'"usage":{{"prompt_tokens":{tokens},"total_tokens":{tokens}}}}}').encode()
