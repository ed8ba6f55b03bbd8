"""Torch tensors on the wire: raw bytes plus dtype name and shape, zero-copy both ways.

Toward a process on the same host, large tensors travel through shared memory (one
copy into a pooled segment, or none for a tensor from ``shared_empty``) and CUDA
tensors as CUDA IPC handles (``_cuda_ipc``); elsewhere CUDA tensors go through pinned
host memory. Imported lazily by the codec the first time a tensor is sent or
received, so ``import shardline`` never imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import msgpack
import torch

from ._errors import ProtocolError, SerializationError
from .transport._codec import EXT_TENSOR, descriptor_buffer, packb, register_ext
from .transport._exchange import exchange
from .transport._placement import shm_reserve, shm_share, shm_wanted

__all__ = ["decode_tensor", "dtype_by_name", "encode_tensor", "put_bytes", "shared_empty"]

# Every dtype with a plain strided byte layout, by its wire name.
_DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in vars(torch).values()
    if isinstance(d, torch.dtype)
}
_QUANTIZED = {torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4}


def shared_empty(shape: int | Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialized CPU tensor in a shared-memory segment of its own.

    Sending it to a process on this host copies nothing: the receiver's tensor maps the
    same memory, so what either side writes the other sees (write before sending, and
    treat it as read-only while a receiver may hold it). The segment lives as long as
    any tensor (here or there) views it; it is never a file in ``/dev/shm``.
    """
    dims = (shape,) if isinstance(shape, int) else tuple(int(d) for d in shape)
    if any(d < 0 for d in dims):
        raise ValueError(f"shape must be non-negative, got {dims}")
    nbytes = math.prod(dims) * dtype.itemsize
    if nbytes == 0:
        return torch.empty(dims, dtype=dtype)
    buf = exchange().allocate(nbytes)
    return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).view(dims)


def dtype_by_name(name: Any) -> torch.dtype:
    """The torch dtype a wire name (``"float32"``, ``"bfloat16"``) stands for."""
    dtype = _DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise ProtocolError(f"unknown torch dtype {name!r:.60}")
    return dtype


def put_bytes(t: torch.Tensor, buffers: list[Any]) -> int | list[int]:
    """Put a CPU or CUDA tensor's bytes where the message carries them: shared memory (lent
    without a copy if the tensor lives there already, else copied into a segment) or a
    frame of its own. Returns what a descriptor names: a frame index or
    ``[process, segment, offset, nbytes]``."""
    nbytes = t.numel() * t.element_size()
    if shm_wanted(buffers, nbytes):
        where = None
        if t.device.type == "cpu" and t.is_contiguous():
            where = shm_share(buffers, t.data_ptr(), nbytes)
        if where is not None:
            return where
        slot = shm_reserve(buffers, nbytes)
        if slot is not None:  # one copy, from any strides (and straight from a GPU)
            dest, where = slot
            raw = torch.frombuffer(dest, dtype=torch.uint8)
            if t.is_contiguous():  # bytes as they are (a typed copy would fix up bools)
                raw.copy_(t.reshape(-1).view(torch.uint8))
            else:
                raw.view(t.dtype).view(t.shape).copy_(t)
            return where
    if t.device.type == "cuda":
        from ._cuda_ipc import to_host

        t = to_host(t)
    t = t.contiguous()
    if nbytes:
        # Raw bytes whatever the dtype: numpy lacks bf16, fp8 and friends.
        buffers.append(t.reshape(-1).view(torch.uint8).numpy().data)
    else:
        buffers.append(b"")
    return len(buffers) - 1


def encode_tensor(t: torch.Tensor, buffers: list[Any]) -> bytes | msgpack.ExtType:
    if t.layout is not torch.strided:
        raise SerializationError(f"tensor with layout {t.layout} cannot be sent; "
                                 "send t.to_dense()")
    if t.dtype in _QUANTIZED:
        raise SerializationError(f"quantized tensor ({t.dtype}) cannot be sent; "
                                 "send t.int_repr() with its scale and zero point")
    t = t.detach()
    if t.device.type == "cuda":
        from . import _cuda_ipc

        handle = _cuda_ipc.share(t, buffers)
        if handle is not None:
            return handle
    elif t.device.type != "cpu":
        t = t.to("cpu")
    t = t.resolve_conj().resolve_neg()
    where = put_bytes(t, buffers)
    name = str(t.dtype).removeprefix("torch.")
    return packb([name, list(t.shape), where])


def decode_tensor(payload: bytes, buffers: Sequence[Any]) -> torch.Tensor:
    name, shape, where = msgpack.unpackb(payload)
    dtype = dtype_by_name(name)
    buf = descriptor_buffer("tensor", shape, where, dtype.itemsize, buffers)
    if memoryview(buf).nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(shape)


register_ext(torch.Tensor, EXT_TENSOR, encode_tensor, decode_tensor)

# Registered with the codec on import: CUDA handles and compressed activations.
from . import _cuda_ipc as _cuda_ipc  # noqa: E402
from . import _wire_dtype as _wire_dtype  # noqa: E402
