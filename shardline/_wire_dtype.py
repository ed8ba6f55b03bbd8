"""Compressed activations: floating tensors squeezed for the wire, restored on arrival.

``bf16`` / ``fp16`` cast; ``int8`` quantizes blocks of 64 values to 8 bits each, with
the block's largest magnitude as its float32 scale (blockwise absmax, as Petals
compresses hidden states): 0.27x the bytes of float32, and the error of a value is at
most half a step of its own block. A packed tensor travels as ext type 5 and the
receiving codec restores the original dtype and shape, so the code that reads it
never sees the difference. Integer and bool tensors, and floats already as small as
the wire form, are sent as they are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import msgpack
import torch

from ._errors import ProtocolError
from .transport._codec import EXT_PACKED, descriptor_buffer, packb, register_ext

__all__ = ["BLOCK", "WIRE_DTYPES", "Packed", "check_wire_dtype", "pack", "unpack"]

WIRE_DTYPES = ("bf16", "fp16", "int8")
BLOCK = 64
_CASTS = {"bf16": torch.bfloat16, "fp16": torch.float16}
_SIZES = {"bf16": 2, "fp16": 2, "int8": 1}


def check_wire_dtype(wire_dtype: str | None) -> str | None:
    if wire_dtype is not None and wire_dtype not in WIRE_DTYPES:
        raise ValueError(f"wire_dtype must be None or one of {', '.join(WIRE_DTYPES)}, "
                         f"got {wire_dtype!r}")
    return wire_dtype


class Packed:
    """A floating tensor in its wire form: ``data`` (cast, or int8 codes padded to whole
    blocks) and, for int8, one float32 ``scales`` entry per block."""

    __slots__ = ("data", "dtype", "scales", "scheme", "shape")

    def __init__(self, scheme: str, dtype: torch.dtype, shape: list[int], data: torch.Tensor,
                 scales: torch.Tensor | None) -> None:
        self.scheme = scheme
        self.dtype = dtype
        self.shape = shape
        self.data = data
        self.scales = scales


def pack(t: torch.Tensor, wire_dtype: str) -> torch.Tensor | Packed:
    """``t`` in its wire form, or ``t`` itself when there is nothing to gain."""
    if not t.is_floating_point() or t.element_size() <= _SIZES[wire_dtype] or t.numel() == 0:
        return t
    with torch.no_grad():
        t = t.detach()
        if wire_dtype in _CASTS:
            return Packed(wire_dtype, t.dtype, list(t.shape), t.to(_CASTS[wire_dtype]), None)
        flat = t.reshape(-1).float()
        pad = -flat.numel() % BLOCK
        if pad:
            flat = torch.nn.functional.pad(flat, (0, pad))
        blocks = flat.view(-1, BLOCK)
        scales = blocks.abs().amax(dim=1)
        inverse = torch.where(scales > 0, 127.0 / scales, torch.zeros_like(scales))
        codes = torch.round(blocks * inverse[:, None]).clamp_(-127, 127).to(torch.int8)
        return Packed("int8", t.dtype, list(t.shape), codes.view(-1), scales)


def unpack(p: Packed) -> torch.Tensor:
    if p.scheme != "int8":
        return p.data.to(p.dtype).view(p.shape)
    assert p.scales is not None
    values = p.data.view(-1, BLOCK).float() * (p.scales[:, None] / 127.0)
    return values.view(-1)[:math.prod(p.shape)].view(p.shape).to(p.dtype)


def _encode(p: Packed, buffers: list[Any]) -> bytes:
    from .tensors import put_bytes

    scales = None if p.scales is None else put_bytes(p.scales, buffers)
    return packb([p.scheme, str(p.dtype).removeprefix("torch."), p.shape,
                  put_bytes(p.data, buffers), scales])


def _decode(payload: bytes, buffers: Sequence[Any]) -> torch.Tensor:
    from .tensors import dtype_by_name

    scheme, name, shape, data_at, scales_at = msgpack.unpackb(payload)
    dtype = dtype_by_name(name)
    if scheme not in WIRE_DTYPES or not dtype.is_floating_point:
        raise ProtocolError(f"packed tensor: unknown scheme {scheme!r:.20} or a non-float "
                            f"dtype {name!r:.20}")
    if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ProtocolError(f"packed tensor shape must be non-negative ints, got {shape!r:.80}")
    n = math.prod(shape)
    if scheme in _CASTS:
        cast = _CASTS[scheme]
        data = descriptor_buffer("packed tensor", [n], data_at, cast.itemsize, buffers)
        values = torch.frombuffer(data, dtype=torch.uint8).view(cast)
        return unpack(Packed(scheme, dtype, shape, values, None))
    blocks = -(-n // BLOCK)
    data = descriptor_buffer("packed tensor codes", [blocks * BLOCK], data_at, 1, buffers)
    scales = descriptor_buffer("packed tensor scales", [blocks], scales_at, 4, buffers)
    return unpack(Packed(scheme, dtype, shape,
                         torch.frombuffer(data, dtype=torch.int8),
                         torch.frombuffer(scales, dtype=torch.uint8).view(torch.float32)))


register_ext(Packed, EXT_PACKED, _encode, _decode)
