"""msgpack headers plus raw buffer frames: the only way values cross the wire.

A message is ``[header, buf0, buf1, ...]``. The header is msgpack; arrays, tensors and
refs inside it are msgpack ext values whose payload names a buffer frame by index, so
bulk data is never copied into the header and is sent and received zero-copy.
Extension types register here from the layers above (refs from ``actors``, tensors
from ``shardline.tensors``), so this module imports neither.
"""

from __future__ import annotations

import contextlib
import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np

from .._errors import ProtocolError, SerializationError
from ._placement import Buffers, Frames, default_shm_min_bytes, shm_reserve, shm_share, shm_wanted

if TYPE_CHECKING:
    from ._exchange import Link

__all__ = [
    "EXT_CUDA",
    "EXT_NDARRAY",
    "EXT_PACKED",
    "EXT_REF",
    "EXT_TENSOR",
    "ANY_SENDER",
    "Codec",
    "Decoder",
    "Encoder",
    "describe",
    "descriptor_buffer",
    "packb",
    "register_decoder",
    "register_ext",
    "release_unviewed",
]

EXT_NDARRAY = 1
EXT_TENSOR = 2
EXT_REF = 3
EXT_CUDA = 4
EXT_PACKED = 5

# encode(obj, buffers) -> ext payload bytes (or a whole ExtType of another code); it
# appends bulk data to ``buffers`` and records the index. decode(payload, buffers) -> obj.
Encoder = Callable[[Any, list[Any]], "bytes | msgpack.ExtType"]
Decoder = Callable[[bytes, Sequence[Any]], Any]

_encoders: dict[type, tuple[int, Encoder]] = {}
_decoders: dict[int, Decoder] = {}
# Extensions living in modules that import heavy libraries are loaded on first use:
# a tensor can only reach the encoder if torch is already imported by the caller.
_lazy_by_type_module = {"torch": "shardline.tensors"}
_lazy_by_code = {EXT_TENSOR: "shardline.tensors", EXT_CUDA: "shardline.tensors",
                 EXT_PACKED: "shardline.tensors"}

_HINTS = {
    set: "send a list instead",
    frozenset: "send a list instead",
    complex: "send [real, imag] or a numpy array",
    bytearray: "send bytes instead",
}


def packb(obj: Any) -> bytes:
    """msgpack-encode an ext payload (typed wrapper)."""
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def register_ext(cls: type, code: int, encode: Encoder, decode: Decoder) -> None:
    """Teach every codec to carry ``cls`` (and its subclasses) as ext type ``code``."""
    _encoders[cls] = (code, encode)
    _decoders[code] = decode


def register_decoder(code: int, decode: Decoder) -> None:
    """Teach every codec to decode ext type ``code``, which some other type's encoder
    produces (a CUDA tensor's IPC handle comes from the tensor encoder)."""
    _decoders[code] = decode


def describe(header: Mapping[str, Any]) -> str:
    """What a message is, for error messages: ``call 'incr'``, ``spawn``."""
    kind = header.get("k")
    if kind in ("call", "tell"):
        return f"{kind} {header.get('m')!r}"
    return str(kind)


class _Unencodable(Exception):
    def __init__(self, obj: object, reason: str) -> None:
        super().__init__(reason)
        self.obj = obj
        self.reason = reason


def _encode_ndarray(arr: np.ndarray[Any, Any], buffers: list[Any]) -> bytes:
    if arr.dtype.hasobject or arr.dtype.fields is not None or arr.dtype.kind == "V":
        raise _Unencodable(arr, f"numpy dtype {arr.dtype} has no raw-buffer form")
    shape = list(arr.shape)
    if shm_wanted(buffers, arr.nbytes):
        where: Any = None
        if arr.flags.c_contiguous:
            where = shm_share(buffers, arr.ctypes.data, arr.nbytes)
        if where is None:
            slot = shm_reserve(buffers, arr.nbytes)
            if slot is not None:
                dest, where = slot
                np.copyto(np.frombuffer(dest, dtype=arr.dtype).reshape(arr.shape), arr)
        if where is not None:
            return packb([arr.dtype.str, shape, where])
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    buffers.append(arr.data if arr.ndim else arr.reshape(1).data)
    return packb([arr.dtype.str, shape, len(buffers) - 1])


# ``shm_from`` when the sender is not known: any process of this host may be named.
ANY_SENDER = -1


class _Incoming(list[Any]):
    """The buffer frames of the message being decoded, the node's frame limit (which
    shared-memory buffers obey too), the process whose segments the message may name
    (``shm_from``: its token, None for none, ``ANY_SENDER``), and the segments it has
    viewed so far (``viewed``: the rest must be given back if the decode fails)."""

    __slots__ = ("max_frame_size", "shm_from", "viewed")
    max_frame_size: int
    shm_from: int | None
    viewed: list[tuple[int, int]] | None


def _is_uint(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 64


def _shm_buffer(what: str, where: list[Any], buffers: Sequence[Any]) -> Any:
    if len(where) != 4 or not all(_is_uint(v) for v in where):
        raise ProtocolError(f"{what} names shared memory as {where!r:.100}; expected "
                            "[process, segment, offset, nbytes]")
    proc, seg, offset, nbytes = where
    # Only the sender's own segments: a view of another process's segment would show
    # the sender that process's data, and its release would let that process reuse the
    # segment while this one's own tensor still maps it.
    sender = getattr(buffers, "shm_from", ANY_SENDER)
    if sender != ANY_SENDER and proc != sender:
        source = "did not offer shared memory" if sender is None else \
            f"is process {sender:016x}"
        raise ProtocolError(f"{what} names shared memory of process {proc:016x}, but its "
                            f"sender {source}")
    limit = getattr(buffers, "max_frame_size", 1 << 30)
    if nbytes > limit:
        raise ProtocolError(f"{what} of {nbytes} bytes in shared memory is over the frame "
                            f"limit of {limit}")
    from ._exchange import exchange

    buf = exchange().view(proc, seg, offset, nbytes)
    if type(buffers) is _Incoming:
        if buffers.viewed is None:
            buffers.viewed = []
        buffers.viewed.append((proc, seg))
    return buf


def descriptor_buffer(what: str, shape: Any, index: Any, itemsize: int,
                      buffers: Sequence[Any]) -> Any:
    """The buffer an array descriptor ``(dtype, shape, where)`` names, after checking
    that ``where`` is a frame of this message (an index) or shared memory lent by a
    process on this host (``[process, segment, offset, nbytes]``) and that the shape is
    non-negative ints whose element count fills that buffer exactly."""
    if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ProtocolError(f"{what} shape must be a list of non-negative integers, "
                            f"got {shape!r:.100}")
    if isinstance(index, list):
        buf = _shm_buffer(what, index, buffers)
    elif not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(buffers):
        raise ProtocolError(f"{what} names buffer frame {index!r:.40}; the message has "
                            f"{len(buffers)} (0 to {len(buffers) - 1})")
    else:
        buf = buffers[index]
    nbytes = memoryview(buf).nbytes
    needed = math.prod(shape) * itemsize
    if needed != nbytes:
        raise ProtocolError(f"{what} of shape {shape!r:.100} needs {needed} bytes, but its "
                            f"frame holds {nbytes}")
    return buf


def release_unviewed(header: Any, shm_from: int | None = ANY_SENDER,
                     viewed: Sequence[tuple[int, int]] | None = None) -> None:
    """Give back the segments a message names but this process never viewed (it was
    refused, or failed to decode before reaching them): their lender waits for a
    release that no view's finalizer will send, and would hold them until this
    process ends. Best effort: a header that is not msgpack names nothing."""
    from ._exchange import current_exchange

    ex = current_exchange()
    if ex is None or shm_from is None or not ex.has_received():
        return
    named: list[tuple[int, int]] = []

    def collect(code: int, payload: bytes) -> None:
        places = _WHERE_AT.get(code)
        if places:
            with contextlib.suppress(Exception):
                fields = msgpack.unpackb(payload)
                for i in places:
                    where = fields[i]
                    if isinstance(where, list) and len(where) == 4 and \
                            all(_is_uint(v) for v in where):
                        named.append((where[0], where[1]))

    with contextlib.suppress(Exception):
        msgpack.unpackb(header, ext_hook=collect, raw=False, strict_map_key=False,
                        timestamp=0)
    left = list(viewed or ())
    for proc, seg in named:
        if (proc, seg) in left:
            left.remove((proc, seg))  # that view's finalizer releases it
        elif shm_from == ANY_SENDER or proc == shm_from:
            ex.decline(proc, seg)


# Where each kind of payload names its buffers: ``[dtype, shape, where]`` (arrays,
# tensors), ``[scheme, dtype, shape, data, scales]`` (packed tensors).
_WHERE_AT = {EXT_NDARRAY: (2,), EXT_TENSOR: (2,), EXT_PACKED: (3, 4)}


def _decode_ndarray(payload: bytes, buffers: Sequence[Any]) -> np.ndarray[Any, Any]:
    dtype_str, shape, index = msgpack.unpackb(payload)
    if not isinstance(dtype_str, str):
        raise ProtocolError(f"ndarray dtype must be a string, got {dtype_str!r:.60}")
    dtype = np.dtype(dtype_str)
    if dtype.hasobject or dtype.fields is not None or dtype.kind == "V":
        raise ProtocolError(f"ndarray dtype {dtype_str!r} has no raw-buffer form")
    buf = descriptor_buffer("ndarray", shape, index, dtype.itemsize, buffers)
    arr: np.ndarray[Any, Any] = np.frombuffer(buf, dtype=dtype)
    shaped: np.ndarray[Any, Any] = arr.reshape(shape)
    return shaped


register_ext(np.ndarray, EXT_NDARRAY, _encode_ndarray, _decode_ndarray)


def _describe(obj: object) -> str:
    name = type(obj).__qualname__
    article = "an" if name[:1].lower() in "aeiou" else "a"
    return f"{article} {name}"


def _locate(root: object, target: object, path: str) -> str | None:
    """Where ``target`` sits inside ``root``, as ``path[1]['key']`` (error path only)."""
    if root is target:
        return path
    if isinstance(root, Mapping):
        for key, value in root.items():
            found = _locate(value, target, f"{path}[{key!r}]")
            if found is not None:
                return found
            if key is target:
                return f"{path} (a key)"
    elif isinstance(root, (list, tuple)):
        for i, value in enumerate(root):
            found = _locate(value, target, f"{path}[{i}]")
            if found is not None:
                return found
    return None


class Codec:
    """Encodes headers to frames and back. One per node; not shared across threads.

    ``extra`` adds per-node extensions (a ref needs the node that resolves it).
    """

    def __init__(self, extra: Mapping[type, tuple[int, Encoder, Decoder]] | None = None,
                 *, max_header_size: int = 16 << 20, max_frame_size: int = 1 << 30) -> None:
        self._extra_enc = {cls: (code, enc) for cls, (code, enc, _) in (extra or {}).items()}
        self._extra_dec = {code: dec for _, (code, _, dec) in (extra or {}).items()}
        self._buffers: list[Any] | None = None  # of the message being encoded
        self._link: Link | None = None
        self._frames: Sequence[Any] = ()
        self._packer = msgpack.Packer(default=self._default, use_bin_type=True,
                                      datetime=False)
        self.max_header_size = max_header_size
        self.max_frame_size = max_frame_size
        # None: never shared memory, whatever the peer
        self.shm_min_bytes = default_shm_min_bytes()
        self._no_frames = _Incoming()
        self._hook = self._ext_hook  # one bound method, not one per message

    # -- encoding --------------------------------------------------------------

    def encode(self, header: dict[str, Any], what: str | None = None,
               link: Link | None = None) -> list[Any]:
        """``[header_bytes, *buffers]``; ``SerializationError`` names what cannot go
        (as ``what``, by default ``describe(header)``). ``link``: the peer is a process
        on this host, reachable by shared memory (large buffers then go there; the
        result is ``Frames``)."""
        # The buffer list is made by the first extension value met (see _default):
        # most messages have none, and this runs for every message.
        self._link = link
        self._buffers = None
        try:
            data = self._packer.pack(header)
            if len(data) > self.max_header_size:
                raise SerializationError(
                    f"{what} header is {len(data)} bytes, over the limit of "
                    f"{self.max_header_size}; send bulk data as numpy arrays or tensors "
                    "(they travel as raw frames)")
        except BaseException as exc:
            self._packer.reset()
            what = what or describe(header)
            lent: list[Any] | None = self._buffers
            if type(lent) is Buffers and lent.placed:
                from ._exchange import exchange

                exchange().unlend(lent.placed)
            if isinstance(exc, _Unencodable):
                raise self._unencodable(header, exc.obj, exc.reason, what) from None
            if isinstance(exc, (OverflowError, ValueError, TypeError)):
                raise SerializationError(f"{what} cannot be encoded: {exc}") from None
            raise
        finally:
            buffers = self._buffers
            self._buffers = self._link = None
        if buffers is None:
            return [data]
        if type(buffers) is Buffers and buffers.placed:
            frames = Frames([data, *buffers])
            frames.placed = buffers.placed
            frames.shm_bytes = buffers.shm_bytes
            return frames
        return [data, *buffers]

    def _default(self, obj: Any) -> Any:
        cls = type(obj)
        entry = self._extra_enc.get(cls) or _encoders.get(cls)
        if entry is None:
            if isinstance(obj, np.generic) and obj.dtype.kind in "biuf":
                return obj.item()  # numpy scalars travel as plain numbers
            if isinstance(obj, int):
                raise _Unencodable(obj, "it does not fit in 64 bits; send it as a string")
            entry = self._find_encoder(cls)
            if entry is None:
                raise _Unencodable(obj, "msgpack cannot carry it and no extension is registered")
        code, encode = entry
        buffers = self._buffers
        if buffers is None:
            link, min_bytes = self._link, self.shm_min_bytes
            buffers = self._buffers = [] if link is None or min_bytes is None else \
                Buffers(link, min_bytes)
        try:
            payload = encode(obj, buffers)
        except SerializationError as exc:
            raise _Unencodable(obj, str(exc)) from None
        if type(payload) is msgpack.ExtType:
            return payload  # the encoder chose another form (a CUDA tensor's IPC handle)
        return msgpack.ExtType(code, payload)

    def _find_encoder(self, cls: type) -> tuple[int, Encoder] | None:
        module = cls.__module__.partition(".")[0]
        lazy = _lazy_by_type_module.get(module)
        if lazy is not None:
            importlib.import_module(lazy)
        for base in cls.__mro__:
            entry = self._extra_enc.get(base) or _encoders.get(base)
            if entry is not None:
                _encoders[cls] = entry  # subclasses (nn.Parameter, np.memmap) hit fast next time
                return entry
        return None

    @staticmethod
    def _unencodable(header: Mapping[str, Any], obj: object, reason: str,
                     what: str) -> SerializationError:
        where = None
        for key, label in (("a", "args"), ("kw", "kwargs"), ("r", "result")):
            if key in header:
                where = _locate(header[key], obj, label)
                if where is not None:
                    break
        place = f"{what} {where}" if where else what
        hint = _HINTS.get(type(obj))
        tail = f"; {hint}" if hint else ""
        return SerializationError(f"{place} ({_describe(obj)}) cannot be sent: {reason}{tail}")

    # -- decoding --------------------------------------------------------------

    def decode(self, header: Any, frames: Sequence[Any],
               shm_from: int | None = ANY_SENDER) -> dict[str, Any]:
        """Decode a received header; ``frames`` are the buffer frames that followed it.
        ``shm_from``: the shared-memory token of the process that sent it (None: it
        offered none), whose segments alone the message may name.

        Anything malformed raises ``ProtocolError``; nothing else escapes. Segments a
        message that failed lent this process are given back to their lender.
        """
        incoming = _Incoming(frames) if frames else self._no_frames
        incoming.max_frame_size = self.max_frame_size
        incoming.shm_from = shm_from
        incoming.viewed = None
        self._frames = incoming
        try:
            if len(header) > self.max_header_size:
                raise ProtocolError(f"header of {len(header)} bytes is over the limit of "
                                    f"{self.max_header_size}")
            msg = msgpack.unpackb(header, ext_hook=self._hook, raw=False,
                                  strict_map_key=False, timestamp=0)
        except ProtocolError:
            release_unviewed(header, shm_from, incoming.viewed)
            raise
        except Exception as exc:
            release_unviewed(header, shm_from, incoming.viewed)
            raise ProtocolError(f"malformed header: {type(exc).__name__}: {exc}") from None
        finally:
            self._frames = ()
            incoming.viewed = None
        if not isinstance(msg, dict):
            raise ProtocolError(f"header must be a map, got {type(msg).__name__}")
        return msg

    def _ext_hook(self, code: int, payload: bytes) -> Any:
        decode = self._extra_dec.get(code) or _decoders.get(code)
        if decode is None and code in _lazy_by_code:
            importlib.import_module(_lazy_by_code[code])
            decode = _decoders.get(code)
        if decode is None:
            raise ProtocolError(f"unknown ext type {code}")
        try:
            return decode(payload, self._frames)
        except ProtocolError:
            raise
        except IndexError:
            raise ProtocolError(f"ext type {code} names a buffer frame that is missing") from None
        except Exception as exc:
            raise ProtocolError(
                f"bad ext type {code} payload: {type(exc).__name__}: {exc}") from None
