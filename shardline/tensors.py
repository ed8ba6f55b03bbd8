"""Torch tensors on the wire: raw bytes plus dtype name and shape, zero-copy both ways.

Imported lazily by the codec the first time a tensor is sent or received, so
``import shardline`` never imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack
import torch

from ._errors import ProtocolError, SerializationError
from .transport._codec import EXT_TENSOR, descriptor_buffer, packb, register_ext

__all__ = ["decode_tensor", "encode_tensor"]

# Every dtype with a plain strided byte layout, by its wire name.
_DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in vars(torch).values()
    if isinstance(d, torch.dtype)
}
_QUANTIZED = {torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4}


def encode_tensor(t: torch.Tensor, buffers: list[Any]) -> bytes:
    if t.layout is not torch.strided:
        raise SerializationError(f"tensor with layout {t.layout} cannot be sent; "
                                 "send t.to_dense()")
    if t.dtype in _QUANTIZED:
        raise SerializationError(f"quantized tensor ({t.dtype}) cannot be sent; "
                                 "send t.int_repr() with its scale and zero point")
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    t = t.resolve_conj().resolve_neg().contiguous()
    flat = t.reshape(-1)
    if flat.numel():
        # Raw bytes whatever the dtype: numpy lacks bf16, fp8 and friends.
        buffers.append(flat.view(torch.uint8).numpy().data)
    else:
        buffers.append(b"")
    name = str(t.dtype).removeprefix("torch.")
    return packb([name, list(t.shape), len(buffers) - 1])


def decode_tensor(payload: bytes, buffers: Sequence[Any]) -> torch.Tensor:
    name, shape, index = msgpack.unpackb(payload)
    dtype = _DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise ProtocolError(f"unknown torch dtype {name!r:.60}")
    buf = descriptor_buffer("tensor", shape, index, dtype.itemsize, buffers)
    if memoryview(buf).nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(shape)


register_ext(torch.Tensor, EXT_TENSOR, encode_tensor, decode_tensor)
