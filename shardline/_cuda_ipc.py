"""CUDA tensors between processes of one host: a CUDA IPC handle instead of the bytes.

The sender exports the tensor's storage with torch's own machinery
(``storage._share_cuda_()``, as ``torch.multiprocessing`` does) but sends the handle
and the tensor's metadata as msgpack (ext type 4), never pickled. It keeps the storage
alive (``Exchange.keep``) until the receiver says it opened the handle (a RELEASE of
the token on the shared-memory connection); from then on torch's IPC reference
counter, whose handle travels along, keeps the memory until the receiver frees it.

Both processes must see the same GPUs in the same order (the device is sent as an
index): the ``hello`` carries ``CUDA_VISIBLE_DEVICES`` and IPC is used only when the
two agree. ``SHARDLINE_CUDA_IPC=0`` turns it off. Elsewhere a CUDA tensor is copied
to pinned host memory (``to_host``), which the GPU writes at full speed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import torch

from ._errors import ProtocolError
from .transport._codec import EXT_CUDA, packb, register_decoder
from .transport._exchange import exchange
from .transport._placement import shm_keep, shm_link, shm_wanted

__all__ = ["CudaDescriptor", "decode_cuda", "enabled", "share", "to_host"]


def enabled() -> bool:
    return os.environ.get("SHARDLINE_CUDA_IPC", "1").strip().lower() not in (
        "0", "off", "no", "false")


def _uint(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 64


def _ints(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


@dataclass(frozen=True)
class CudaDescriptor:
    """What a receiver needs to map a CUDA tensor of another process (ext type 4)."""

    dtype: str
    shape: list[int]
    stride: list[int]
    offset: int                 # storage offset, in elements
    device: int                 # CUDA device index, as both processes number them
    handle: bytes               # cudaIpcMemHandle of the allocation holding the storage
    size_bytes: int             # storage size
    offset_bytes: int           # storage start within the allocation
    ref_counter_handle: bytes   # torch's shared reference counter (a file name)
    ref_counter_offset: int
    event_handle: bytes         # cudaIpcEventHandle to wait on before reading
    event_sync_required: bool
    proc: int                   # the sender's shared-memory process token
    token: int                  # what to RELEASE once the handle is open

    def pack(self) -> bytes:
        return packb([self.dtype, self.shape, self.stride, self.offset, self.device,
                      self.handle, self.size_bytes, self.offset_bytes,
                      self.ref_counter_handle, self.ref_counter_offset, self.event_handle,
                      self.event_sync_required, self.proc, self.token])

    @staticmethod
    def unpack(payload: bytes) -> CudaDescriptor:
        """Decode and check a payload; ``ProtocolError`` names what is wrong."""
        try:
            fields = msgpack.unpackb(payload)
        except Exception as exc:
            raise ProtocolError(f"malformed CUDA tensor descriptor: {exc}") from None
        if not isinstance(fields, list) or len(fields) != 14:
            raise ProtocolError("a CUDA tensor descriptor is an array of 14 fields")
        (dtype, shape, stride, offset, device, handle, size_bytes, offset_bytes, rc_handle,
         rc_offset, event_handle, event_sync, proc, token) = fields
        checks = (
            (isinstance(dtype, str), "dtype must be a string"),
            (_ints(shape) and _ints(stride) and len(shape) == len(stride),
             "shape and stride must be lists of non-negative ints of one length"),
            (all(_uint(v) for v in (offset, device, size_bytes, offset_bytes, rc_offset,
                                    proc, token)), "offsets, sizes and ids must be uints"),
            (all(isinstance(v, bytes) for v in (handle, rc_handle, event_handle)),
             "handles must be binary"),
            (isinstance(event_sync, bool), "event_sync_required must be a bool"),
        )
        for ok, why in checks:
            if not ok:
                raise ProtocolError(f"bad CUDA tensor descriptor: {why}")
        if shape:
            last = offset + sum((d - 1) * s for d, s in zip(shape, stride, strict=True)
                                if d > 0)
            itemsize = _dtype(dtype).itemsize
            if 0 not in shape and (last + 1) * itemsize > size_bytes:
                raise ProtocolError("bad CUDA tensor descriptor: the tensor overruns its "
                                    "storage")
        return CudaDescriptor(dtype, shape, stride, offset, device, handle, size_bytes,
                              offset_bytes, rc_handle, rc_offset, event_handle, event_sync,
                              proc, token)


def _dtype(name: str) -> torch.dtype:
    from .tensors import dtype_by_name

    return dtype_by_name(name)


def share(t: torch.Tensor, buffers: list[Any]) -> msgpack.ExtType | None:
    """The IPC form of CUDA tensor ``t`` when the peer is a process on this host that
    sees the same GPUs and ``t`` is large enough for shared memory; None otherwise (the
    caller copies the bytes)."""
    link = shm_link(buffers)
    # Small tensors are cheaper to copy than a handle is to export, open and release.
    if link is None or not shm_wanted(buffers, t.numel() * t.element_size()) or \
            not link.confirmed or not enabled() or \
            link.gpus != os.environ.get("CUDA_VISIBLE_DEVICES"):
        return None
    storage = t.untyped_storage()
    (device, handle, size_bytes, offset_bytes, rc_handle, rc_offset, event_handle,
     event_sync) = storage._share_cuda_()  # type: ignore[no-untyped-call]
    kept = shm_keep(buffers, storage)
    assert kept is not None
    proc, token = kept
    desc = CudaDescriptor(str(t.dtype).removeprefix("torch."), list(t.shape),
                          list(t.stride()), int(t.storage_offset()), int(device), bytes(handle),
                          int(size_bytes), int(offset_bytes), bytes(rc_handle),
                          int(rc_offset), bytes(event_handle or b""), bool(event_sync),
                          proc, token)
    return msgpack.ExtType(EXT_CUDA, desc.pack())


def rebuild(desc: CudaDescriptor) -> torch.Tensor:
    """Open the handle (needs CUDA); the tensor lives on ``cuda:<desc.device>``."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    if not torch.cuda.is_available():
        raise ProtocolError("a CUDA tensor arrived by IPC handle, but this process has no "
                            "CUDA; start it with the same CUDA_VISIBLE_DEVICES as the sender, "
                            "or set SHARDLINE_CUDA_IPC=0 on the sender")
    tensor: torch.Tensor = rebuild_cuda_tensor(  # type: ignore[no-untyped-call]
        torch.Tensor, tuple(desc.shape), tuple(desc.stride), desc.offset,
        torch.storage.TypedStorage, _dtype(desc.dtype), desc.device, desc.handle,
        desc.size_bytes, desc.offset_bytes, False, desc.ref_counter_handle,
        desc.ref_counter_offset, desc.event_handle or None, desc.event_sync_required)
    return tensor


def decode_cuda(payload: bytes, buffers: Sequence[Any]) -> torch.Tensor:
    desc = CudaDescriptor.unpack(payload)
    try:
        return rebuild(desc)
    except ProtocolError:
        raise
    except Exception as exc:
        raise ProtocolError(f"cannot open a CUDA IPC handle: {type(exc).__name__}: "
                            f"{exc}") from None
    finally:
        # Opened or not, the sender need not keep the storage for us any longer.
        exchange().acknowledge(desc.proc, desc.token)


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy of CUDA tensor ``t`` in pinned memory (from torch's caching host
    allocator, so not pinned afresh each time), complete when this returns."""
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    torch.cuda.current_stream(t.device).synchronize()
    return host


# Encoded by the tensor encoder, which picks this form for a CUDA tensor when it can.
register_decoder(EXT_CUDA, decode_cuda)
