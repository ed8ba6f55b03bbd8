"""Actors on other nodes: the ref target that talks to them, ``RemoteNode``, and the
handler that serves this node's actors to the network."""

from __future__ import annotations

import asyncio
import importlib
import time
from typing import TYPE_CHECKING, Any

import msgpack

from .._errors import (
    ActorNotFound,
    ActorStopped,
    NodeLost,
    ProtocolError,
    SerializationError,
    ShardlineError,
    Unauthorized,
)
from .._runtime import to_thread
from ..transport import PROTOCOL_VERSION, Peer, Reply, split_key
from ..transport._codec import packb
from ._actor import Actor
from ._cell import ActorCell, actor_error
from ._lifecycle import OnError, StopInfo, StopReason
from ._ref import ActorRef

if TYPE_CHECKING:
    from ._node import Node

__all__ = ["RemoteNode", "RemoteTarget", "StoppedTarget", "decode_ref", "encode_ref",
           "serve_request"]

# Unacknowledged tells in flight per (peer, actor) before ``tell`` waits.
TELL_WINDOW = 128
V = PROTOCOL_VERSION


class RemoteTarget:
    """Delivers a ref's messages to an actor on another node.

    The actor lives as long as its node's process, which a node id names. The ref uses
    a connection to that node while it lasts; once it is lost (closed, silent, or the
    node declared lost), the next message reconnects: the same node id (the process
    was frozen, or the loop of either side stalled) and the ref works again; another
    node id (a new process at the address) and the ref is dead for good.
    """

    __slots__ = ("_actor_id", "_address", "_bound", "_gone", "_node", "_node_id")

    def __init__(self, node: Node, address: str, actor_id: int,
                 node_id: str | None = None) -> None:
        self._node = node
        self._address = address
        self._actor_id = actor_id
        self._node_id = node_id  # the node the actor lives on, once known
        self._bound: Peer | None = None
        self._gone: str | None = None  # why the actor is known to be gone for good

    async def _peer(self, timeout: float | None = None) -> Peer:
        """The live connection to the actor's node, reconnecting if it was lost."""
        if self._gone is not None:
            raise NodeLost(self._gone)
        bound = self._bound
        if bound is not None and not bound.is_lost:
            return bound
        peer = await self._node._peer(self._address, timeout)
        assert peer.node_id is not None
        if self._node_id is None:
            self._node_id = peer.node_id
        elif peer.node_id != self._node_id:
            self._bound = None
            self._gone = (f"node {self._node_id} at {self._address} was lost"
                          + (f" ({bound.lost_reason})" if bound is not None else "")
                          + f"; node {peer.node_id} listens there now, so actor "
                          f"#{self._actor_id} is gone")
            raise NodeLost(self._gone)
        self._bound = peer
        return peer

    async def ask(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                  timeout: float | None) -> Any:
        peer = self._bound
        if peer is None or peer.is_lost:
            peer = await self._peer(timeout)
        header = {"v": V, "k": "call", "to": self._actor_id, "m": method, "a": args,
                  "kw": kwargs}
        metrics = self._node.metrics
        if metrics is None:
            if timeout is None:
                # The common case, without the coroutine of Peer.call around it.
                fut = peer.request(header)
                try:
                    return await fut
                except asyncio.CancelledError:
                    peer.give_up(header)
                    raise
            return await peer.call(header, timeout)
        started = time.monotonic()
        try:
            return await peer.call(header, timeout)
        finally:
            metrics.observe_ask(time.monotonic() - started)

    async def tell(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        peer = self._bound
        if peer is None or peer.is_lost:
            peer = await self._peer()
        await peer.tell({"v": V, "k": "tell", "to": self._actor_id, "m": method, "a": args,
                         "kw": kwargs}, self._actor_id, TELL_WINDOW)

    async def stop(self) -> None:
        try:
            peer = await self._peer()
            await peer.call({"v": V, "k": "stop", "to": self._actor_id}, None)
        except NodeLost:
            return  # a lost node's actors are as stopped as they get

    async def wait_stopped(self) -> StopInfo:
        while True:
            try:
                peer = await self._peer()
            except NodeLost as exc:
                return StopInfo(StopReason.NODE_LOST, str(exc))
            try:
                info = await peer.call({"v": V, "k": "watch", "to": self._actor_id}, None)
            except NodeLost:
                continue  # the connection was lost, not necessarily the node: ask again
            return _stop_info_from_wire(info)


class StoppedTarget:
    """Target of a ref to a local actor that no longer exists."""

    __slots__ = ("_info", "_label")

    def __init__(self, label: str, info: StopInfo | None = None) -> None:
        self._label = label
        self._info = info or StopInfo(StopReason.STOPPED)

    async def ask(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                  timeout: float | None) -> Any:
        raise ActorStopped(f"actor {self._label} has stopped")

    async def tell(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        raise ActorStopped(f"actor {self._label} has stopped")

    async def stop(self) -> None:
        return None

    async def wait_stopped(self) -> StopInfo:
        return self._info


def _stop_info_from_wire(info: Any) -> StopInfo:
    if not isinstance(info, dict):
        raise ProtocolError(f"malformed stop info: {info!r:.100}")
    try:
        reason = StopReason(info.get("reason"))
    except ValueError:
        raise ProtocolError(f"unknown stop reason {info.get('reason')!r}") from None
    error = info.get("error")
    return StopInfo(reason, None if error is None else str(error))


class RemoteNode:
    """Another node, as seen from this one (``await node.connect(address)``).

    ``devices`` lists what the node may compute on (``"cpu"``, ``"cuda:0"``, ...), so
    placement can say ``(node, node.devices[-1])``; ``host``, ``pid``, ``rank`` and
    ``local_rank`` are what it said about itself (``None`` where unknown).
    """

    def __init__(self, node: Node, address: str, node_id: str,
                 info: dict[str, Any] | None = None) -> None:
        self._node = node
        self.address = address
        self.node_id = node_id
        info = info or {}
        self.devices: list[str] = list(info.get("devices") or ["cpu"])
        self.host: str | None = info.get("host")
        self.pid: int | None = info.get("pid")
        self.rank: int | None = info.get("rank")
        self.local_rank: int | None = info.get("local_rank")
        # Why its process is known to have ended (set by a supervisor): new requests
        # fail at once instead of trying to reconnect to a dead address.
        self._ended: str | None = None

    async def spawn(self, cls: str, *args: Any, name: str | None = None,
                    mailbox_size: int = 1024, on_error: OnError = "resume",
                    max_restarts: int = 3, within: float = 60.0,
                    timeout: float | None = None, **kwargs: Any) -> ActorRef:
        """Spawn ``"pkg.module:Class"`` there; the peer must allow ``pkg.module``."""
        if not isinstance(cls, str) or ":" not in cls:
            raise TypeError(f"remote spawn takes an import path 'pkg.module:Class', got {cls!r}")
        if self._ended is not None:
            raise NodeLost(self._ended)
        peer = await self._node._peer(self.address)
        ref = await peer.call({
            "v": V, "k": "spawn", "cls": cls, "a": args, "kw": kwargs,
            "opt": {"name": name, "mailbox_size": mailbox_size, "on_error": on_error,
                    "max_restarts": max_restarts, "within": within},
        }, timeout)
        return _expect_ref(ref)

    async def lookup(self, name: str, *, timeout: float | None = None) -> ActorRef:
        """The ref of the actor called ``name`` there (``ActorNotFound`` if none)."""
        if self._ended is not None:
            raise NodeLost(self._ended)
        peer = await self._node._peer(self.address)
        return _expect_ref(await peer.call({"v": V, "k": "lookup", "name": name}, timeout))

    def __repr__(self) -> str:
        rank = "" if self.rank is None else f" rank={self.rank}"
        return f"<RemoteNode {self.address} id={self.node_id}{rank}>"


def _expect_ref(value: Any) -> ActorRef:
    if not isinstance(value, ActorRef):
        raise ProtocolError(f"expected an actor ref, got {type(value).__name__}")
    return value


# -- refs on the wire --------------------------------------------------------------------

def encode_ref(node: Node, ref: ActorRef, buffers: list[Any]) -> bytes:
    address = ref.address
    if address.startswith("inproc://"):
        raise SerializationError(
            f"{ref!r} lives on a node that does not listen, so no other node can reach it; "
            "give that node listen='tcp://...'")
    return packb([address, ref.actor_id, ref.name])


def decode_ref(node: Node, payload: bytes, buffers: Any) -> ActorRef:
    address, actor_id, name = msgpack.unpackb(payload)
    if not isinstance(address, str) or not isinstance(actor_id, int) or not (
            name is None or isinstance(name, str)):
        raise ValueError("ref must be [address: str, actor id: int, name: str | nil]")
    if address == node.address:
        local = node._cell_or_none(actor_id)
        if local is not None:
            return local.ref
        return ActorRef(address, actor_id, name, StoppedTarget(name or f"#{actor_id}",
                                                               node._stop_info(actor_id)))
    # A ref arriving while a connection to its node is up names an actor of that node
    # (node ids tell a restarted process from the one the actor lived in).
    peer = node._cached_peer(split_key(address)[0])
    node_id = None if peer is None or peer.is_lost else peer.node_id
    return ActorRef(address, actor_id, name, RemoteTarget(node, address, actor_id, node_id))


# -- serving this node's actors -------------------------------------------------------------

def serve_request(node: Node, msg: dict[str, Any], reply: Reply) -> None:
    """Handle one request from the network. Never blocks: slow work becomes a task."""
    kind = msg.get("k")
    if kind == "call" or kind == "tell":
        cell = node._cell(_actor_id(msg))
        method, args, kwargs = msg.get("m"), msg.get("a", []), msg.get("kw", {})
        if not isinstance(method, str) or not isinstance(args, list) or not isinstance(
                kwargs, dict) or (kwargs and not all(isinstance(k, str) for k in kwargs)):
            raise ProtocolError("a call needs m: str, a: array, kw: map with string keys")
        if kind == "call":
            reply.on_cancel = cell.abandon
            cell.deliver(method, tuple(args), kwargs, reply, None)
        else:
            cell.deliver(method, tuple(args), kwargs, None, reply)
    elif kind == "spawn":
        node._start_task(_spawn, node, msg, reply)
    elif kind == "lookup":
        name = msg.get("name")
        if not isinstance(name, str):
            raise ProtocolError("lookup needs name: str")
        reply.set_result(node.ref(name))
    elif kind == "stop" or kind == "watch":
        actor_id = _actor_id(msg)
        live = node._cell_or_none(actor_id)
        if live is not None:
            node._start_task(_stop if kind == "stop" else _watch, live, reply)
            return
        info = node._stop_info(actor_id)
        if info is None:
            raise ProtocolError(f"{kind}: node {node.address} never had an actor #{actor_id}")
        reply.set_result(None if kind == "stop" else _stop_info_to_wire(info))
    else:
        raise ProtocolError(f"unknown message kind {kind!r}")


def _actor_id(msg: dict[str, Any]) -> int:
    actor_id = msg.get("to")
    if not isinstance(actor_id, int) or isinstance(actor_id, bool):
        raise ProtocolError(f"{msg.get('k')} needs to: int (an actor id), got {actor_id!r:.40}")
    return actor_id


def _stop_info_to_wire(info: StopInfo) -> dict[str, Any]:
    return {"reason": info.reason.value, "error": info.error}


# Spawn options a peer may send, each with its check and what it must be.
_SPAWN_OPTIONS: dict[str, tuple[Any, str]] = {
    "name": (lambda v: v is None or isinstance(v, str), "a string or nil"),
    "mailbox_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "on_error": (lambda v: v in ("resume", "restart", "stop"),
                 "one of 'resume', 'restart', 'stop'"),
    "max_restarts": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "within": (lambda v: (_is_int(v) or isinstance(v, float)) and v > 0,
               "a number of seconds > 0"),
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _spawn_options(opt: dict[Any, Any]) -> dict[str, Any]:
    """The known options of a spawn request, checked; unknown ones are ignored (a
    newer peer may send more)."""
    options = {}
    for key, (valid, expected) in _SPAWN_OPTIONS.items():
        if key in opt:
            value = opt[key]
            if not valid(value):
                raise ProtocolError(f"spawn option {key} must be {expected}, "
                                    f"got {value!r:.60}")
            options[key] = value
    return options


async def _spawn(node: Node, msg: dict[str, Any], reply: Reply) -> None:
    try:
        path, args, kwargs, opt = msg.get("cls"), msg.get("a", []), msg.get("kw", {}), msg.get(
            "opt", {})
        if not isinstance(path, str) or not isinstance(args, list) or not isinstance(
                kwargs, dict) or not isinstance(opt, dict) or not all(
                isinstance(k, str) for k in kwargs):
            raise ProtocolError("spawn needs cls: str, a: array, kw: map with string keys, "
                                "opt: map")
        options = _spawn_options(opt)
        cls = await _import_actor(path, node.allow)
        reply.set_result(await node.spawn(cls, *args, **options, **kwargs))
    except ShardlineError as exc:
        reply.set_exception(exc)
    except Exception as exc:  # bad arguments, a node shutting down: the peer hears why
        reply.set_exception(actor_error(exc, str(msg.get("cls"))))


async def _import_actor(path: str, allow: tuple[str, ...]) -> type[Actor]:
    module_name, _, attr = path.partition(":")
    if not any(module_name == a or module_name.startswith(a + ".") for a in allow):
        raise Unauthorized(
            f"this node does not allow spawning from module {module_name!r}; start it with "
            f"--allow {module_name} (allowed now: {', '.join(allow) or 'nothing'})")
    try:
        # In a thread: a first import (torch, say) can take seconds, and the loop must
        # keep answering heartbeats meanwhile.
        obj: Any = await to_thread(importlib.import_module, module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as exc:
        raise actor_error(exc, path) from exc
    if not (isinstance(obj, type) and issubclass(obj, Actor)):
        raise ActorNotFound(f"{path} is not a shardline.Actor subclass")
    return obj


async def _stop(cell: ActorCell, reply: Reply) -> None:
    try:
        await cell.stop()
    finally:
        reply.set_result(None)


async def _watch(cell: ActorCell, reply: Reply) -> None:
    reply.set_result(_stop_info_to_wire(await cell.wait_stopped()))
