"""``Node``: owns actors, their names and the task group they run in."""

from __future__ import annotations

import logging
import os
import random
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Iterable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup

from .._errors import ActorNameTaken, ActorNotFound, ActorStopped, NodeLost
from ..transport import (
    EXT_REF,
    Codec,
    Endpoint,
    KeyPair,
    Limits,
    Peer,
    new_node_id,
    parse_tcp,
)
from ..transport import load_allow_keys as _load_allow_keys
from ._actor import Actor
from ._cell import ActorCell
from ._hostinfo import describe, peer_info
from ._lifecycle import OnError, RestartPolicy, StopInfo, StopReason
from ._looplag import LoopLag
from ._mesh import ActorMesh, spawn_many
from ._ref import ActorRef
from ._remote import RemoteNode, decode_ref, encode_ref, serve_request

if TYPE_CHECKING:
    from .._metrics import NodeMetrics

__all__ = ["Node"]

log = logging.getLogger("shardline.actors")

# How many stopped actors a node remembers, with why they stopped: enough for calls,
# watches and stops that race with the stop to get the same answers as in-process.
STOPPED_RECORD = 4096


class Node:
    """A home for actors. Use as ``async with Node() as node:``.

    Without ``listen`` the node is in-process only (it can still call out to other
    nodes). With ``listen="tcp://host:port"`` (port 0 picks a free one) its actors are
    reachable at ``node.address``. ``allow`` names the modules peers may spawn actors
    from. ``keys`` (a directory made by ``shardline keys generate``) turns on CURVE, and
    then only clients whose public keys are in ``allow_keys`` get in. Listening on a
    non-loopback address without keys is refused unless ``insecure=True``.

    Leaving the block stops every actor gracefully (``on_stop`` runs); an actor still
    busy after ``stop_timeout`` seconds is cancelled.

    ``max_queued_bytes`` bounds the replies queued toward any one client connection
    (see docs/wire-protocol.md, "Backpressure on replies").

    Time: a peer silent for ``peer_timeout`` seconds is lost; each peer is pinged every
    ``heartbeat_interval`` seconds (default ``peer_timeout / 5``); opening a connection
    and its handshake may take ``connect_timeout`` seconds when the call gives no
    ``timeout``. docs/actors.md ("Nodes") lists every option.
    """

    def __init__(self, listen: str | None = None, *, allow: Iterable[str] = (),
                 advertise: str | None = None,
                 keys: str | os.PathLike[str] | KeyPair | None = None,
                 allow_keys: Iterable[str | os.PathLike[str]] | None = None,
                 insecure: bool = False, peer_timeout: float = 5.0,
                 heartbeat_interval: float | None = None, connect_timeout: float = 10.0,
                 max_header_size: int = 16 << 20, max_frames: int = 1024,
                 max_frame_size: int = 1 << 30, stop_timeout: float = 5.0,
                 metrics: bool = False, max_queued_bytes: int = 256 << 20) -> None:
        # Addresses are checked here, so a bad one is a ValueError before any socket.
        for what, value in (("listen", listen), ("advertise", advertise)):
            if value is not None:
                try:
                    parse_tcp(value)
                except ValueError as exc:
                    raise ValueError(f"bad {what} address: {exc}") from None
        if max_queued_bytes < 1:
            raise ValueError(f"max_queued_bytes must be >= 1, got {max_queued_bytes}")
        self.node_id = new_node_id()
        self.address = f"inproc://{self.node_id}"
        self.listen = listen
        # shardline's own model layer (stage actors, reference models) is always allowed:
        # pipelines need it on every worker, and it runs no code a peer chooses.
        self.allow = ("shardline.models", *(a for a in allow if a != "shardline.models"))
        self.advertise = advertise
        self.keys = keys if isinstance(keys, KeyPair) or keys is None else KeyPair.load(keys)
        self.allow_keys = _load_allow_keys(allow_keys or ())
        if self.keys is not None:
            self.allow_keys.append(self.keys.public.decode())  # a node may call itself
        self.insecure = insecure
        self.peer_timeout = peer_timeout
        self.heartbeat_interval = heartbeat_interval
        self.connect_timeout = connect_timeout
        self.limits = Limits(max_header_size, max_frames, max_frame_size)
        self.stop_timeout = stop_timeout
        self.max_queued_bytes = max_queued_bytes
        self.loop_lag = LoopLag()
        # What peers learn about this node when they connect (host, pid, devices, rank).
        self.info: dict[str, Any] = describe()
        # Prometheus metrics of this node's actors and peers (imported only when asked)
        self.metrics: NodeMetrics | None = None
        if metrics:
            from .._metrics import NodeMetrics as _NodeMetrics

            self.metrics = _NodeMetrics(self)
        # Random start: a node restarted on the same address never reuses an id that a
        # ref from its previous life could still name. Ids are handed out in order, so
        # [first, next) is every id this node ever gave.
        self._first_id = self._next_id = random.getrandbits(31) << 16
        self._cells: dict[int, ActorCell] = {}
        self._stopped: OrderedDict[int, tuple[str, StopInfo]] = OrderedDict()
        self._names: dict[str, ActorCell | None] = {}  # None: reserved while starting
        self._tg: TaskGroup | None = None
        self._endpoint: Endpoint | None = None
        self._closing = False

    async def __aenter__(self) -> Node:
        if self._tg is not None:
            raise RuntimeError("this Node is already running")
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        tg.start_soon(self.loop_lag.run, name="loop lag")
        if self.listen is not None:
            try:
                endpoint = self._ensure_endpoint()
                self.address = endpoint.listen(self.listen, advertise=self.advertise,
                                               insecure=self.insecure)
            except BaseException:
                await self.__aexit__(None, None, None)
                raise
        return self

    def _ensure_endpoint(self) -> Endpoint:
        if self._endpoint is None:
            if self._tg is None or self._closing:
                raise RuntimeError("the node is not running: use 'async with Node() as node'")
            codec = Codec({ActorRef: (EXT_REF,
                                      lambda ref, bufs: encode_ref(self, ref, bufs),
                                      lambda payload, bufs: decode_ref(self, payload, bufs))},
                          max_header_size=self.limits.max_header_size)
            self._endpoint = Endpoint(
                self.node_id, lambda msg, reply: serve_request(self, msg, reply), codec,
                limits=self.limits, peer_timeout=self.peer_timeout,
                heartbeat_interval=self.heartbeat_interval, keys=self.keys,
                allow_keys=self.allow_keys, max_queued_bytes=self.max_queued_bytes)
            self._endpoint.info = self.info
            self._endpoint.start(self._tg)
        return self._endpoint

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> bool | None:
        tg = self._tg
        assert tg is not None
        self._closing = True
        with anyio.CancelScope(shield=True):
            await self._stop_all()
        if self._endpoint is not None:
            self._endpoint.close()
        tg.cancel_scope.cancel()  # heartbeats and request tasks; actors are done
        try:
            # Every actor has stopped, so the group only waits for their last
            # cleanup; the body's own exception propagates as itself, not wrapped
            # in an ExceptionGroup.
            await tg.__aexit__(None, None, None)
        finally:
            self._tg = None
        return None

    async def _stop_all(self) -> None:
        cells = list(self._cells.values())
        for cell in cells:
            cell.request_stop()
        with anyio.move_on_after(self.stop_timeout):
            for cell in cells:
                await cell.wait_stopped()
        for cell in cells:
            if not cell.stopped:
                log.warning("actor %s still busy after %.1f s; cancelling it",
                            cell.label, self.stop_timeout)
                cell.cancel()

    async def spawn(self, cls: type[Actor], *args: Any, name: str | None = None,
                    mailbox_size: int = 1024, on_error: OnError = "resume",
                    max_restarts: int = 3, within: float = 60.0, **kwargs: Any) -> ActorRef:
        """Create an actor from ``cls(*args, **kwargs)``, run ``on_start``, return its ref.

        Raises ``ActorError`` if the constructor or ``on_start`` raises, and
        ``ActorNameTaken`` if a live actor on this node already has ``name``.
        """
        tg = self._tg
        if tg is None or self._closing:
            raise RuntimeError("spawn() needs a running node: use 'async with Node() as node'")
        if not (isinstance(cls, type) and issubclass(cls, Actor)):
            raise TypeError(f"spawn() needs a subclass of shardline.Actor, got {cls!r}")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"an actor name must be a string, got {type(name).__name__}")
        if name is not None:
            if name in self._names:
                raise ActorNameTaken(f"an actor named {name!r} already lives on this node")
            self._names[name] = None
        try:
            actor_id = self._next_id
            self._next_id += 1
            ref = ActorRef(self.address, actor_id, name, None)  # type: ignore[arg-type]
            cell = ActorCell(self, ref, cls, args, kwargs, mailbox_size=mailbox_size,
                             on_error=on_error, policy=RestartPolicy(max_restarts, within),
                             stop_timeout=self.stop_timeout)
            ref._target = cell
            await cell.start()
        except BaseException:
            if name is not None:
                del self._names[name]
            raise
        self._cells[actor_id] = cell
        if name is not None:
            self._names[name] = cell
        tg.start_soon(cell.run, name=f"actor {cell.label}")
        return ref

    async def spawn_many(self, cls: type[Actor] | str, nodes: Sequence[Node | RemoteNode],
                         *args: Any, **kwargs: Any) -> ActorMesh:
        """One actor from ``cls(*args, **kwargs)`` on each of ``nodes`` (this node, or
        ``RemoteNode``s; ``cls`` as ``"pkg.module:Class"`` for remote ones), spawned in
        parallel; ``await mesh.call("method", ...)`` then asks them all and gathers in
        rank order."""
        return await spawn_many(cls, nodes, *args, **kwargs)

    # -- networking ------------------------------------------------------------------

    async def connect(self, address: str, *, timeout: float | None = None) -> RemoteNode:
        """Connect to the node at ``address`` (handshake included) and return it."""
        peer = await self._peer(address, timeout)
        assert peer.node_id is not None
        info = peer_info(peer)
        return RemoteNode(self, address, peer.node_id, info)

    async def lookup(self, address: str, name: str, *,
                     timeout: float | None = None) -> ActorRef:
        """A ref to the actor called ``name`` on the node at ``address``."""
        if address == self.address:
            return self.ref(name)
        return await (await self.connect(address, timeout=timeout)).lookup(name,
                                                                            timeout=timeout)

    def peers(self) -> list[Peer]:
        """Live connections this node opened to other nodes."""
        return [] if self._endpoint is None else self._endpoint.peers()

    async def _peer(self, address: str, timeout: float | None = None) -> Peer:
        endpoint = self._ensure_endpoint()
        return await endpoint.peer(address, timeout=timeout or self.connect_timeout)

    def _cached_peer(self, address: str) -> Peer | None:
        return None if self._endpoint is None else self._endpoint.cached_peer(address)

    def _declare_lost(self, address: str, error: NodeLost) -> None:
        """Fail the live connection to ``address``, if any, with ``error``: every pending
        ask to it fails at once. For a supervisor that knows the node's process ended;
        the next use of the address reconnects (and fails if nothing answers)."""
        if self._endpoint is not None:
            self._endpoint.declare_lost(address, error)

    def _cell(self, actor_id: Any) -> ActorCell:
        """The live actor ``actor_id``; ``ActorStopped`` if it lived here and stopped,
        ``ActorNotFound`` if this node never had it."""
        cell = self._cells.get(actor_id)
        if cell is None:
            stopped = self._stopped.get(actor_id)
            if stopped is not None:
                label, info = stopped
                why = "" if info.reason is StopReason.STOPPED else (
                    f" ({info.reason.value}: {info.error})")
                raise ActorStopped(f"actor {label} has stopped{why}")
            if self._ever_spawned(actor_id):
                raise ActorStopped(f"actor #{actor_id} has stopped")
            raise ActorNotFound(f"no actor #{actor_id} on node {self.address}")
        return cell

    def _cell_or_none(self, actor_id: Any) -> ActorCell | None:
        return self._cells.get(actor_id)

    def _stop_info(self, actor_id: Any) -> StopInfo | None:
        """Why actor ``actor_id`` stopped, if it did and is still remembered. An actor
        that stopped so long ago that it was forgotten reports a plain ``STOPPED``."""
        stopped = self._stopped.get(actor_id)
        if stopped is not None:
            return stopped[1]
        if self._ever_spawned(actor_id) and actor_id not in self._cells:
            return StopInfo(StopReason.STOPPED)
        return None

    def _ever_spawned(self, actor_id: Any) -> bool:
        return (isinstance(actor_id, int) and not isinstance(actor_id, bool)
                and self._first_id <= actor_id < self._next_id)

    def _start_task(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        """Run ``fn(*args)`` in the node's task group. A failure is logged, never allowed
        to take the node down: these tasks serve what peers asked for."""
        if self._tg is None:
            raise RuntimeError("the node is not running")

        async def guarded() -> None:
            try:
                await fn(*args)
            except Exception:
                log.exception("background task %s failed", getattr(fn, "__qualname__", fn))

        self._tg.start_soon(guarded)

    # -- local registry ----------------------------------------------------------------

    def ref(self, name: str) -> ActorRef:
        """The ref of the live actor called ``name`` on this node."""
        cell = self._names.get(name)
        if cell is None or cell.stopped:
            raise ActorNotFound(f"no actor named {name!r} on node {self.address}")
        return cell.ref

    def actors(self) -> list[ActorRef]:
        """Refs of every live actor on this node."""
        return [cell.ref for cell in self._cells.values()]

    def statistics(self) -> dict[str, Any]:
        """A snapshot for dashboards and debugging: one entry per live actor and per
        peer; the event loop's lag (seconds; see ``LoopLag.statistics``); and, on a
        listening node, the replies queued toward its clients."""
        endpoint = self._endpoint
        return {
            "address": self.address,
            "actors": [cell.statistics() for cell in self._cells.values()],
            "peers": [{"address": p.address, "node_id": p.node_id, "pending": len(p.pending)}
                      for p in self.peers()],
            "loop_lag": self.loop_lag.statistics(),
            "outgoing": None if endpoint is None else endpoint.outgoing_statistics(),
        }

    def _forget(self, cell: ActorCell) -> None:
        actor_id = cell.ref.actor_id
        self._cells.pop(actor_id, None)
        if cell.ref.name is not None and self._names.get(cell.ref.name) is cell:
            del self._names[cell.ref.name]
        info = cell.stop_info
        if info is not None:
            if len(self._stopped) >= STOPPED_RECORD:
                self._stopped.popitem(last=False)
            self._stopped[actor_id] = (cell.label, info)

    def __repr__(self) -> str:
        state = "running" if self._tg is not None else "idle"
        return f"<Node {self.address} {state}, {len(self._cells)} actors>"
