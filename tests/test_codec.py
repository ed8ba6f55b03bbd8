"""The codec alone: every dtype, refusals with a location, malformed input."""

from __future__ import annotations

import pathlib

import msgpack
import numpy as np
import pytest
import torch

import shardline as sl
import shardline.tensors as tensors
from shardline.transport import Codec

ALL_TORCH_DTYPES = sorted(set(tensors._DTYPES.values()) - tensors._QUANTIZED, key=str)


def roundtrip(value: object) -> object:
    codec = Codec()
    frames = codec.encode({"a": [value]})
    return codec.decode(frames[0], frames[1:])["a"][0]


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    itemsize = dtype.itemsize
    n = int(np.prod(shape)) * itemsize
    raw = torch.from_numpy(np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8))
    return raw.view(dtype).reshape(shape)


@pytest.mark.parametrize("dtype", ALL_TORCH_DTYPES, ids=str)
def test_every_torch_dtype_roundtrips_bitwise(dtype: torch.dtype) -> None:
    t = random_tensor(dtype, (3, 4))
    out = roundtrip(t)
    assert isinstance(out, torch.Tensor)
    assert out.dtype == dtype and out.shape == t.shape
    assert torch.equal(out.view(torch.uint8), t.view(torch.uint8))


def test_tensor_shapes_layouts_and_views() -> None:
    t = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    for value in (t.T, t[:, ::2], t[1], torch.tensor(3.5), torch.empty(0, 5),
                  torch.ones(2, 3, requires_grad=True) * 2,
                  torch.nn.Parameter(torch.ones(2)),
                  torch.randn(3, dtype=torch.complex64).conj()):
        out = roundtrip(value)
        assert isinstance(out, torch.Tensor)
        assert out.shape == value.shape
        assert torch.equal(out, value.detach().resolve_conj())


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "int8", "uint16",
                                   "int64", "bool", "complex128", ">i4"])
def test_numpy_arrays_roundtrip(dtype: str) -> None:
    a = np.arange(12).astype(dtype).reshape(3, 4)
    for value in (a, a.T, a[::2], a[:1, :1].reshape(())):
        out = roundtrip(value)
        assert isinstance(out, np.ndarray)
        np.testing.assert_array_equal(out, value)
        assert out.dtype == value.dtype


def test_buffers_travel_as_frames_not_in_the_header() -> None:
    codec = Codec()
    big = np.zeros(1 << 20, dtype=np.uint8)
    frames = codec.encode({"a": [big, torch.zeros(1 << 18)]})
    assert len(frames) == 3
    assert len(frames[0]) < 200


def test_numpy_scalars_travel_as_plain_numbers() -> None:
    assert roundtrip(np.int64(7)) == 7
    assert roundtrip(np.float32(0.5)) == 0.5
    assert roundtrip(np.bool_(True)) is True


def test_native_values_and_tuples_as_lists() -> None:
    value = {"s": "é", "b": b"\x00\xff", "i": -(2**63), "f": 1.5, "n": None,
             "l": [1, (2, 3)], 7: True}
    out = roundtrip(value)
    assert out == {"s": "é", "b": b"\x00\xff", "i": -(2**63), "f": 1.5, "n": None,
                   "l": [1, [2, 3]], 7: True}


@pytest.mark.parametrize(("value", "where", "kind"), [
    ({1, 2}, "args[1]", "a set"),
    ({"x": [1, object()]}, "args[1]['x'][1]", "an object"),
    ([1, 2.0j], "args[1][1]", "a complex"),
    (np.array([object()]), "args[1]", "ndarray"),
    (torch.ones(2).to_sparse(), "args[1]", "a Tensor"),
])
def test_unsendable_values_name_type_and_place(value: object, where: str, kind: str) -> None:
    codec = Codec()
    with pytest.raises(sl.SerializationError) as info:
        codec.encode({"k": "call", "m": "f", "a": [0, value], "kw": {}}, "call 'f'")
    text = str(info.value)
    assert where in text and kind in text, text


def test_unsendable_kwarg_and_big_int() -> None:
    codec = Codec()
    with pytest.raises(sl.SerializationError, match=r"kwargs\['opt'\].*a set"):
        codec.encode({"a": [], "kw": {"opt": {1}}})
    with pytest.raises(sl.SerializationError, match=r"args\[0\] \(an int\).*64 bits"):
        codec.encode({"a": [2**70]})


def test_header_size_limit() -> None:
    codec = Codec(max_header_size=1000)
    with pytest.raises(sl.SerializationError, match="over the limit"):
        codec.encode({"a": ["x" * 2000]})
    with pytest.raises(sl.ProtocolError, match="over the limit"):
        codec.decode(b"\x80" * 2000, [])


@pytest.mark.parametrize("header", [
    b"\xc1",                                                     # never-used msgpack byte
    b"\x92\x01",                                                 # truncated array
    msgpack.packb([1, 2]),                                       # not a map
    msgpack.packb({"a": msgpack.ExtType(99, b"")}),              # unknown ext type
    msgpack.packb({"a": msgpack.ExtType(1, msgpack.packb(["<f4", [2], 5]))}),  # no frame 5
    msgpack.packb({"a": msgpack.ExtType(1, b"\xc1")}),           # bad ext payload
    msgpack.packb({"a": msgpack.ExtType(2, msgpack.packb(["nope", [1], 0]))}),  # bad dtype
    msgpack.packb({"a": msgpack.ExtType(1, msgpack.packb(["<f4", [3], 0]))}),  # size mismatch
])
def test_malformed_headers_raise_protocol_error(header: bytes) -> None:
    with pytest.raises(sl.ProtocolError):
        Codec().decode(header, [b"\x00" * 4])


def test_no_pickle_anywhere_in_the_package() -> None:
    root = pathlib.Path(sl.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert "import pickle" not in text and "cloudpickle" not in text, path
