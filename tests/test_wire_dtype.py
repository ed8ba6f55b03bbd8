"""Compressed activations: the packing itself, through the codec, and in pipelines whose
stages run in worker processes (bytes counted by the step trace)."""

from __future__ import annotations

import math

import msgpack
import pytest
import torch

import shardline as sl
from shardline._wire_dtype import BLOCK, Packed, pack, unpack
from shardline.models import Pipeline
from shardline.models._tree import map_tensors
from shardline.transport._codec import EXT_PACKED, Codec
from tests.test_pipeline import CE, spec

pytestmark = pytest.mark.anyio

SGD = ("torch.optim.SGD", {"lr": 0.1})


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def roundtrip(value: object) -> object:
    codec = Codec()
    frames = codec.encode({"v": value})
    return codec.decode(frames[0], frames[1:])["v"]


@pytest.mark.parametrize("shape", [(1,), (63,), (64,), (3, 65), (4, 64, 128), ()])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_int8_error_is_at_most_half_a_step_of_its_block(shape: tuple[int, ...],
                                                        dtype: torch.dtype) -> None:
    t = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
    packed = pack(t, "int8")
    assert isinstance(packed, Packed)
    out = roundtrip(packed)
    assert isinstance(out, torch.Tensor)
    assert out.dtype == dtype and out.shape == t.shape
    flat = t.float().reshape(-1)
    pad = -flat.numel() % BLOCK
    absmax = torch.nn.functional.pad(flat.abs(), (0, pad)).view(-1, BLOCK).amax(1)
    step = (absmax / 127).repeat_interleave(BLOCK)[:flat.numel()]
    # half a step from rounding, plus the target dtype's own rounding of the result
    slack = step / 2 + flat.abs() * (2 ** -7 if dtype in (torch.bfloat16, torch.float16)
                                     else 1e-6)
    assert torch.all((out.float().reshape(-1) - flat).abs() <= slack + 1e-12)


def test_int8_keeps_zeros_and_extremes() -> None:
    t = torch.zeros(200)
    t[70] = -5.0
    t[130] = 1e30
    out = unpack(pack(t, "int8"))  # type: ignore[arg-type]
    assert out[70] == -5.0 and out[130] == pytest.approx(1e30, rel=1e-6)
    assert torch.count_nonzero(out[:64]) == 0  # an all-zero block stays zero
    assert torch.count_nonzero(out[140:]) == 0


@pytest.mark.parametrize("wire_dtype,cast", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_casts_are_exactly_the_cast(wire_dtype: str, cast: torch.dtype) -> None:
    t = torch.randn(5, 7, dtype=torch.float64)
    out = roundtrip(pack(t, wire_dtype))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    assert torch.equal(out, t.to(cast).to(torch.float64))


def test_what_is_never_packed() -> None:
    ints = torch.arange(100)
    flags = torch.ones(100, dtype=torch.bool)
    half = torch.randn(100, dtype=torch.bfloat16)
    empty = torch.empty(0, 4)
    assert pack(ints, "int8") is ints
    assert pack(flags, "bf16") is flags
    assert pack(half, "fp16") is half  # already two bytes: nothing to gain
    assert pack(empty, "int8") is empty
    tree = map_tensors({"x": torch.randn(3), "ids": ints, "rest": [torch.randn(2), "tag"]},
                       lambda t: pack(t, "int8"))  # what a device link does
    assert isinstance(tree["x"], Packed) and tree["ids"] is ints
    assert isinstance(tree["rest"][0], Packed) and tree["rest"][1] == "tag"


def test_bytes_on_the_wire() -> None:
    t = torch.randn(4, 64, 128)
    plain = sum(len(memoryview(f)) for f in Codec().encode({"v": t}))
    for wire_dtype, most in (("int8", 0.27), ("bf16", 0.51), ("fp16", 0.51)):
        frames = Codec().encode({"v": pack(t, wire_dtype)})
        assert sum(len(memoryview(f)) for f in frames) <= most * plain, wire_dtype


@pytest.mark.parametrize("payload,match", [
    (["int9", "float32", [4], 0, None], "unknown scheme"),
    (["int8", "int64", [4], 0, 1], "non-float"),
    (["int8", "float32", [-1], 0, 1], "non-negative"),
    (["int8", "float32", [4], 0, 1], "needs 64 bytes"),
    (["bf16", "float32", [3], 0, None], "needs 6 bytes"),
])
def test_bad_packed_payloads_are_protocol_errors(payload: list[object], match: str) -> None:
    header = msgpack.packb({"v": msgpack.ExtType(EXT_PACKED, msgpack.packb(payload))})
    with pytest.raises(sl.ProtocolError, match=match):
        Codec().decode(header, [b"\x00" * 4, b"\x00" * 8])


def test_bad_wire_dtype_is_refused_before_anything_starts() -> None:
    from shardline._wire_dtype import check_wire_dtype

    with pytest.raises(ValueError, match="wire_dtype must be"):
        check_wire_dtype("int4")


def _batch(n: int = 16, dim: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return torch.randn(n, dim, generator=gen), torch.randint(0, 4, (n,), generator=gen)


async def test_pipeline_across_processes_sends_fewer_bytes_and_still_learns() -> None:
    x, y = _batch(64, 64)
    bytes_per_step: dict[str | None, int] = {}
    losses: dict[str | None, list[float]] = {}
    async with sl.LocalCluster(2, allow=["tests"]) as cluster:
        for wire_dtype in (None, "int8", "bf16"):
            torch.manual_seed(0)
            pipe = await Pipeline.start(cluster.node, spec(dim=64), placement=cluster.nodes,
                                        schedule="1f1b", microbatches=4, loss_fn=CE,
                                        optimizer=SGD, wire_dtype=wire_dtype, trace=True)
            try:
                losses[wire_dtype] = [await pipe.train_step(x, y) for _ in range(8)]
                out = await pipe(x)
                assert out.dtype == torch.float32  # restored on arrival
                trace = await pipe.timeline()
            finally:
                await pipe.stop()
            step = trace.steps[-2]
            assert step.what == "train"
            bytes_per_step[wire_dtype] = step.bytes_sent()
    assert bytes_per_step[None] > 0
    assert bytes_per_step["int8"] <= 0.3 * bytes_per_step[None]
    assert bytes_per_step["bf16"] <= 0.55 * bytes_per_step[None]
    for wire_dtype, curve in losses.items():
        assert all(math.isfinite(v) for v in curve), wire_dtype
        assert curve[-1] < curve[0], wire_dtype  # it learns


async def test_wire_dtype_does_nothing_within_a_process() -> None:
    x, y = _batch()
    async with sl.Node() as node:
        results = []
        for wire_dtype in (None, "int8"):
            torch.manual_seed(0)
            pipe = await Pipeline.start(node, spec(), stages=2, microbatches=4, loss_fn=CE,
                                        optimizer=SGD, wire_dtype=wire_dtype, trace=True)
            try:
                results.append([await pipe.train_step(x, y) for _ in range(3)])
                assert (await pipe.timeline()).steps[-1].bytes_sent() == 0
            finally:
                await pipe.stop()
    assert results[0] == results[1]  # bit for bit: nothing was compressed
