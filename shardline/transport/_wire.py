"""Protocol constants, limits, and errors as they travel in an ``error`` reply."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from .. import _errors
from .._errors import ActorError, ShardlineError

__all__ = ["PROTOCOL_VERSION", "Limits", "error_from_wire", "error_to_wire", "salvage_id"]

PROTOCOL_VERSION = 1


@dataclass(frozen=True)
class Limits:
    """What a node accepts from the network; checked before anything is allocated
    where ZeroMQ allows it (``max_frame_size`` is the socket's ``ZMQ_MAXMSGSIZE``: a
    peer that sends a larger frame is disconnected before the frame is buffered)."""

    max_header_size: int = 16 << 20
    max_frames: int = 1024
    max_frame_size: int = 1 << 30

    def __post_init__(self) -> None:
        for name in ("max_header_size", "max_frames", "max_frame_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


def error_to_wire(exc: BaseException) -> dict[str, Any]:
    """Any exception -> the ``e`` field of an ``error`` message."""
    if isinstance(exc, ActorError):
        return {"t": "ActorError", "m": exc.message, "rt": exc.type_name,
                "tb": exc.remote_traceback, "actor": exc.actor}
    if isinstance(exc, ShardlineError):
        return {"t": type(exc).__name__, "m": str(exc)}
    return {"t": "ActorError", "m": str(exc), "rt": type(exc).__qualname__, "tb": "",
            "actor": ""}


def error_from_wire(e: Any) -> ShardlineError:
    """The ``e`` field of an ``error`` message -> the exception to raise at the caller."""
    if not isinstance(e, dict):
        return _errors.ProtocolError(f"malformed error reply: {e!r:.200}")
    kind = str(e.get("t", ""))
    message = str(e.get("m", ""))
    if kind == "ActorError":
        return ActorError(str(e.get("rt", "")), message, str(e.get("tb", "")),
                          str(e.get("actor", "")))
    cls = getattr(_errors, kind, None)
    if isinstance(cls, type) and issubclass(cls, ShardlineError) and cls is not ActorError:
        return cls(message)
    return _errors.ProtocolError(f"peer reported an unknown error type {kind!r}: {message}")


def salvage_id(header: Any) -> int | None:
    """Best effort: the request id of a header that failed to decode, to answer it."""
    try:
        msg = msgpack.unpackb(header, ext_hook=lambda code, data: None, raw=False,
                              strict_map_key=False)
    except Exception:
        return None
    if isinstance(msg, dict):
        rid = msg.get("id")
        if isinstance(rid, int) and not isinstance(rid, bool):
            return rid
    return None
