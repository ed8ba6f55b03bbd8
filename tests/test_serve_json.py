"""The server's JSON in and out, without a server: a big body's parser (on a worker
thread) reads what ``json.loads`` reads and refuses what it refuses, with a 400."""

from __future__ import annotations

import base64
import json
from typing import Any

import anyio
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shardline.serve._errors import Reject
from shardline.serve._json import INLINE_BYTES, MAX_CONTAINERS, embeddings_json, parse

pytestmark = pytest.mark.anyio

values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) |
    st.text(st.characters(categories=["L", "N", "P", "Z", "S", "Cs", "Cc"])),
    lambda inner: st.lists(inner, max_size=5) |
    st.dictionaries(st.text(max_size=6), inner, max_size=5),
    max_leaves=30)


def padded(value: Any) -> bytes:
    """``value`` as JSON, with whitespace enough to go the big-body way."""
    return json.dumps(value).encode() + b" " * (INLINE_BYTES + 1)


async def parsed(raw: bytes) -> Any:
    return await parse(raw, anyio.CapacityLimiter(1))


@given(values)
@settings(max_examples=300, deadline=None)
def test_big_and_small_bodies_parse_as_json_loads_does(value: Any) -> None:
    async def both() -> tuple[Any, Any]:
        return await parsed(json.dumps(value).encode()), await parsed(padded(value))

    small, big = anyio.run(both)
    assert small == big == json.loads(json.dumps(value))


@pytest.mark.parametrize("raw", [
    b"[" * 100_000 + b"]" * 100_000,
    b'{"a": ' * 50_000 + b"1" + b"}" * 50_000,
    b"[" * 5_000 + b"]" * 5_000,  # small: the C parser
    b'{"n": ' + b"9" * 5000 + b"}",
    b'{"a": "\xff"}',
    b'{"a": 1,}' + b" " * INLINE_BYTES,
    b"[" + b"[]," * MAX_CONTAINERS + b"[]]" + b" " * INLINE_BYTES,  # the garbage collector
    b"",
])
async def test_bodies_json_refuses_are_400s(raw: bytes) -> None:
    with pytest.raises(Reject) as caught:
        await parsed(raw)
    assert caught.value.status == 400 and caught.value.message


async def test_an_embeddings_answer_is_the_same_json_inline_or_on_a_thread() -> None:
    vectors = [torch.randn(384) for _ in range(30)]  # 30 * 384 floats: a worker thread
    limiter = anyio.CapacityLimiter(1)
    big = json.loads(await embeddings_json(vectors, "float", "m\u00e9", 7, limiter))
    small = json.loads(await embeddings_json(vectors[:2], "float", "m\u00e9", 7, limiter))
    assert big["model"] == "m\u00e9" and big["usage"] == {"prompt_tokens": 7,
                                                          "total_tokens": 7}
    assert [d["index"] for d in big["data"]] == list(range(30))
    assert big["data"][:2] == small["data"]
    assert torch.tensor(big["data"][5]["embedding"]).equal(vectors[5])
    packed = json.loads(await embeddings_json(vectors, "base64", "m", 7, limiter))
    row = torch.frombuffer(bytearray(base64.b64decode(packed["data"][5]["embedding"])),
                           dtype=torch.float32)
    assert row.equal(vectors[5])
