"""A node's presence on the network.

One ROUTER bound on the listen address receives requests from every peer and sends
replies back on the connection each came in on; one DEALER per peer this node calls
(``Peer``) carries its own requests. A reply never needs a connection of its own, and
requests from A to B are ordered because they share A's single DEALER to B.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import anyio
import zmq
import zmq.auth.thread
from anyio.abc import TaskGroup

from .._errors import NodeLost, ProtocolError, ShardlineError, Unauthorized
from ._address import is_loopback, parse_tcp, primary_address, split_key, with_key
from ._codec import Codec, release_unviewed
from ._curve import KeyPair
from ._exchange import Link, exchange, poll_exchange
from ._ipc import bind_ipc
from ._loopsock import LoopSocket
from ._outgoing import Outgoing
from ._peer import Peer
from ._shmsock import is_id
from ._wire import PROTOCOL_VERSION, Limits, error_to_wire, salvage_id

__all__ = ["Endpoint", "Reply", "RequestHandler"]

log = logging.getLogger("shardline.transport")

# Client connections whose shared-memory link a node remembers (oldest forgotten first).
_MAX_SHM_ROUTES = 4096
# Client connections whose shared-memory token a node remembers (a client forgotten
# here has its shared-memory buffers refused, so far more than links).
_MAX_SHM_PROCS = 1 << 16


class Reply:
    """Where the answer to one incoming request goes. Duck-types the part of
    ``asyncio.Future`` an actor's mailbox uses, so a remote ask is handled exactly like a
    local one, without a task or a future of its own."""

    __slots__ = ("_cancelled", "_done", "_endpoint", "_id", "_route", "on_cancel")

    def __init__(self, endpoint: Endpoint, route: bytes, rid: int) -> None:
        self._endpoint = endpoint
        self._route = route
        self._id = rid
        self._done = False
        self._cancelled = False
        self.on_cancel: Callable[[Reply], None] | None = None

    def done(self) -> bool:
        return self._done

    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        """The caller gave up (timeout or cancellation): answer nothing, stop the work."""
        if self._done:
            return
        self._done = self._cancelled = True
        self._endpoint.inflight.pop((self._route, self._id), None)
        if self.on_cancel is not None:
            self.on_cancel(self)

    def set_result(self, value: Any) -> None:
        if self._done:
            return
        self._done = True
        endpoint = self._endpoint
        endpoint.inflight.pop((self._route, self._id), None)
        try:
            frames = endpoint.codec.encode(
                {"v": PROTOCOL_VERSION, "k": "reply", "id": self._id, "r": value}, "result",
                endpoint.shm_links.get(self._route))
        except ShardlineError as exc:
            frames = endpoint.error_frames(self._id, exc)
        endpoint.router_send(self._route, frames, self._id)

    def set_exception(self, exc: BaseException) -> None:
        if self._done:
            return
        self._done = True
        self._endpoint.inflight.pop((self._route, self._id), None)
        self._endpoint.router_send(self._route, self._endpoint.error_frames(self._id, exc))


# handler(message, reply): must not block; may start tasks; raising ShardlineError
# answers the request with that error.
RequestHandler = Callable[[dict[str, Any], Reply], None]


class Endpoint:
    def __init__(self, node_id: str, handler: RequestHandler, codec: Codec, *,
                 limits: Limits, peer_timeout: float, heartbeat_interval: float | None,
                 keys: KeyPair | None, allow_keys: Iterable[str] | None,
                 max_queued_bytes: int = 256 << 20) -> None:
        if peer_timeout <= 0:
            raise ValueError("peer_timeout must be > 0")
        if max_queued_bytes < 1:
            raise ValueError("max_queued_bytes must be >= 1")
        self.node_id = node_id
        self.codec = codec
        codec.max_frame_size = limits.max_frame_size  # shared-memory buffers obey it too
        self.limits = limits
        self.peer_timeout = peer_timeout
        self.heartbeat_interval = heartbeat_interval or peer_timeout / 5
        self.keys = keys
        self._allow_keys = set(allow_keys or ())
        self._handler = handler
        self.context: zmq.Context[Any] = zmq.Context()
        self.address: str | None = None
        self.bind_host = "127.0.0.1"  # the interface listen() bound
        self._router: LoopSocket | None = None
        self._auth: zmq.auth.thread.ThreadAuthenticator | None = None
        self._peers: dict[str, Peer] = {}
        self._connecting: dict[str, asyncio.Future[Peer]] = {}
        # address -> why the last peer there was lost; a reconnect names it.
        self._lost: dict[str, str] = {}
        self.max_queued_bytes = max_queued_bytes
        self._outgoing: Outgoing | None = None
        self._listening = anyio.Event()
        # When this node's event loop last came back from a stall: peers cannot have
        # been heard while it was stalled, so their silence counts from here.
        self.awake_since = time.monotonic()
        # The pong names this node, so a client notices a restart at the same address.
        self._pong = codec.encode({"v": PROTOCOL_VERSION, "k": "pong", "node": node_id})
        # (route, request id) -> Reply of asks being handled, so a "cancel" finds them.
        self.inflight: dict[tuple[bytes, int], Reply] = {}
        # What the hello answer says about this node beyond its id (host, devices, ...);
        # the layer above fills it in.
        self.info: dict[str, Any] = {}
        # route -> shared memory toward that client's process, when its hello said it
        # runs on this host (its replies' large buffers go there).
        self.shm_links: dict[bytes, Link] = {}
        # route -> the shared-memory token its hello announced: the only process whose
        # segments that client's messages may name.
        self.shm_procs: dict[bytes, int] = {}
        # The hello's offer of this node's ipc:// endpoint to clients on its host.
        self._ipc_offer: dict[str, str] | None = None
        self._closed = False

    # -- sockets -------------------------------------------------------------------

    def configure(self, sock: zmq.Socket[Any]) -> None:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self.limits.max_frame_size)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)

    def make_curve_client(self, sock: zmq.Socket[Any], server_key: str | None) -> None:
        if server_key is None:
            return  # the server has no key: plain connection (our keys stay unused)
        pair = self.keys or KeyPair.generate()
        sock.curve_secretkey = pair.secret
        sock.curve_publickey = pair.public
        sock.curve_serverkey = server_key.encode()

    def make_curve_server(self, sock: zmq.Socket[Any]) -> None:
        """Accept only CURVE clients the node's allow-list admits (no-op without keys)."""
        if self.keys is None:
            return
        sock.curve_server = True
        sock.curve_secretkey = self.keys.secret
        sock.curve_publickey = self.keys.public

    def listen(self, address: str, *, advertise: str | None, insecure: bool) -> str:
        host, _ = parse_tcp(address)
        if advertise is not None:
            parse_tcp(advertise)  # before any socket exists: nothing to clean up
        if self.keys is None and not is_loopback(host) and not insecure:
            raise Unauthorized(
                f"refusing to listen on {address} without CURVE keys: anyone who can reach it "
                "could spawn actors. Pass keys=DIR / --keys DIR (see 'shardline keys generate') or "
                "insecure=True / --insecure on a trusted network")
        router = self.context.socket(zmq.ROUTER)
        try:
            self.configure(router)
            # Refuse (EAGAIN / EHOSTUNREACH) rather than silently drop a message for a
            # client at its high-water mark or gone: Outgoing decides what happens.
            router.setsockopt(zmq.ROUTER_MANDATORY, 1)
            if self.keys is not None:
                self._auth = zmq.auth.thread.ThreadAuthenticator(self.context)
                self._auth.start()
                self._auth.configure_curve_callback("*", _KeyCheck(self._allow_keys))
            self.make_curve_server(router)
            try:
                router.bind(address)
            except zmq.ZMQError as exc:
                raise OSError(exc.errno,
                              f"cannot listen on {address}: {exc.strerror}") from None
            bound_host, port = parse_tcp(router.getsockopt_string(zmq.LAST_ENDPOINT))
            self.bind_host = bound_host if ":" not in bound_host else f"[{bound_host}]"
            if advertise is None:
                if bound_host in ("0.0.0.0", "::", "*"):
                    bound_host = primary_address()
                advertise = f"tcp://{bound_host}:{port}"
            elif advertise.endswith(":0"):
                advertise = f"{advertise[:-2]}:{port}"
            self._ipc_offer = bind_ipc(router, self.node_id)
            self._router = LoopSocket(router, self._on_request, copied=2)
        except BaseException:
            router.close(linger=0)
            if self._auth is not None:
                self._auth.stop()
                self._auth = None
            raise
        self._outgoing = Outgoing(self._router, self._refusal,
                                  max_bytes=self.max_queued_bytes,
                                  stall_timeout=self.peer_timeout)
        self._listening.set()
        self.address = with_key(advertise, self.keys.public.decode() if self.keys else None)
        return self.address

    def start(self, tg: TaskGroup) -> None:
        """Start the heartbeat and reply-backlog tasks (owned by the node's task group)."""
        tg.start_soon(self._heartbeats)
        tg.start_soon(self._pump_replies)

    def router_send(self, route: bytes, frames: list[Any], rid: int | None = None) -> None:
        """Send to the client at ``route``; ``rid``: the request this answers, if any."""
        if self._outgoing is not None and self._router is not None:
            self._outgoing.send(route, frames, rid)

    def _refusal(self, rid: int, size: int, queued: int) -> list[Any]:
        return self.error_frames(rid, ProtocolError(
            f"reply of {size} bytes not sent: {queued} bytes of replies to this connection "
            f"are still unread (max_queued_bytes={self.max_queued_bytes}); read replies "
            "before asking for more, or raise the node's max_queued_bytes"))

    async def _pump_replies(self) -> None:
        await self._listening.wait()
        assert self._outgoing is not None
        await self._outgoing.run(lambda: self.awake_since)

    def outgoing_statistics(self) -> dict[str, int] | None:
        """Replies queued toward this node's clients (None: the node does not listen)."""
        return None if self._outgoing is None else self._outgoing.statistics()

    def shm_info(self) -> dict[str, Any] | None:
        """What this node's hellos say about shared memory (None: it is not used)."""
        if self.codec.shm_min_bytes is None:
            return None
        return exchange().hello_info()

    def error_frames(self, rid: int, exc: BaseException) -> list[Any]:
        return self.codec.encode(
            {"v": PROTOCOL_VERSION, "k": "error", "id": rid, "e": error_to_wire(exc)})

    # -- incoming requests -----------------------------------------------------------

    def _on_request(self, frames: list[Any]) -> None:
        route = frames[0]
        if len(frames) < 2:
            log.warning("dropped a message with no header")
            return
        header = frames[1]
        shm_from = self.shm_procs.get(route)
        outgoing = self._outgoing
        if outgoing is not None and outgoing.is_dropped(route):
            # A client dropped for not reading its replies is not served again; what
            # it lent for the message goes back.
            release_unviewed(header, shm_from)
            return
        if len(frames) - 2 > self.limits.max_frames:
            release_unviewed(header, shm_from)
            self._refuse(route, header, ProtocolError(
                f"message has {len(frames) - 2} buffer frames, over the limit of "
                f"{self.limits.max_frames}"))
            return
        try:
            msg = self.codec.decode(header, [f.buffer for f in frames[2:]]
                                    if len(frames) > 2 else [], shm_from)
        except ProtocolError as exc:
            self._refuse(route, header, exc)
            return
        rid = msg.get("id")
        if msg.get("v") != PROTOCOL_VERSION:
            self._refuse(route, header, ProtocolError(
                f"protocol version {msg.get('v')!r} not supported; this node speaks "
                f"{PROTOCOL_VERSION}"))
            return
        kind = msg.get("k")
        if kind == "ping":
            self.router_send(route, self._pong)
            return
        if not isinstance(rid, int) or isinstance(rid, bool):
            log.warning("dropped a %r message without an integer id", kind)
            return
        if kind == "cancel":
            gone = self.inflight.get((route, rid))
            if gone is not None:
                gone.cancel()
            return
        reply = Reply(self, route, rid)
        if kind == "call":
            self.inflight[(route, rid)] = reply
        elif kind == "hello":
            answer = {"v": PROTOCOL_VERSION, "node": self.node_id, "addr": self.address,
                      "info": self.info}
            if self._ipc_offer is not None:
                answer["ipc"] = self._ipc_offer
            shm = self.shm_info() if "shm" in msg else None
            if shm is not None:
                answer["shm"] = shm
                proc = msg["shm"].get("proc") if isinstance(msg["shm"], dict) else None
                if proc is not None and is_id(proc):
                    _remember(self.shm_procs, route, proc, _MAX_SHM_PROCS)
                link = exchange().link_to(msg["shm"])
                if link is not None:
                    _remember(self.shm_links, route, link, _MAX_SHM_ROUTES)
            reply.set_result(answer)
            return
        try:
            self._handler(msg, reply)
        except ShardlineError as exc:
            reply.set_exception(exc)
        except Exception as exc:
            log.exception("request handler raised")
            reply.set_exception(ProtocolError(f"request failed: {type(exc).__name__}: {exc}"))

    def _refuse(self, route: bytes, header: Any, exc: ShardlineError) -> None:
        rid = salvage_id(header)
        log.warning("refused a message: %s", exc)
        if rid is not None:
            self.router_send(route, self.error_frames(rid, exc))

    # -- peers -----------------------------------------------------------------------

    async def peer(self, address: str, *, timeout: float,
                   server_key: str | None = None) -> Peer:
        """The live connection to ``address``, made (with a hello) if needed."""
        base, key = split_key(address)
        peer = self._peers.get(base)
        if peer is not None:
            return peer
        if self._closed:
            raise NodeLost("this node is closed")
        pending = self._connecting.get(base)
        if pending is not None:
            return await asyncio.shield(pending)
        parse_tcp(base)  # a bad address is a ValueError, before any bookkeeping
        fut: asyncio.Future[Peer] = asyncio.get_running_loop().create_future()
        self._connecting[base] = fut
        lost = self._lost.get(base)
        try:
            peer = Peer(self, base, server_key or key)
            try:
                # A refused CURVE handshake fails the hello at once (see Peer._on_monitor),
                # and so does a refused connection to an address whose node was lost.
                await peer.hello(timeout, refused_is_lost=lost is not None)
            except NodeLost as exc:
                peer.close()
                if lost is None:
                    raise
                raise NodeLost(f"{lost}; reconnecting failed: {exc}") from None
            except BaseException:
                peer.close()
                raise
            self._lost.pop(base, None)
            self._peers[base] = peer
            fut.set_result(peer)
            return peer
        except BaseException as exc:
            if not fut.done():
                fut.set_exception(exc if isinstance(exc, Exception) else NodeLost("cancelled"))
                fut.exception()  # retrieved: no "never retrieved" warning when unawaited
            raise
        finally:
            del self._connecting[base]

    def cached_peer(self, address: str) -> Peer | None:
        return self._peers.get(address)

    def forget(self, peer: Peer) -> None:
        """``peer`` was lost: the next request to its address reconnects."""
        if self._peers.get(peer.address) is peer:
            del self._peers[peer.address]
            self._lost.pop(peer.address, None)
            if len(self._lost) >= 4096:
                del self._lost[next(iter(self._lost))]
            self._lost[peer.address] = peer.lost_reason

    def declare_lost(self, address: str, error: NodeLost) -> None:
        """Fail the live peer at ``address``, if any, with ``error`` (its process is
        known to have ended). If it was lost already, later reconnects name ``error``
        as the reason."""
        base = split_key(address)[0]
        peer = self._peers.get(base)
        if peer is not None:
            peer.fail(error)
        elif base in self._lost:
            self._lost[base] = str(error)

    def peers(self) -> list[Peer]:
        return list(self._peers.values())

    async def _heartbeats(self) -> None:
        check = min(self.heartbeat_interval, self.peer_timeout / 10)
        last_ping = 0.0
        due = time.monotonic() + check
        while True:
            await anyio.sleep(check)
            now = time.monotonic()
            if now - due > check:
                # This loop was stalled (a long synchronous call): nothing was read or
                # pinged meanwhile, so a peer's silence counts from now. Ping at once.
                self.awake_since = now
                last_ping = 0.0
            due = now + check
            ping = now - last_ping >= self.heartbeat_interval
            if ping:
                last_ping = now
            if self._outgoing is not None:
                self._outgoing.sweep(now, self.awake_since)
            poll_exchange()  # shared memory: releases, dead peers, idle segments
            for peer in list(self._peers.values()):
                silent = now - max(peer.last_seen, self.awake_since)
                if silent > self.peer_timeout:
                    log.warning("node %s silent for %.1f s: lost", peer.address, silent)
                    peer.fail(NodeLost(
                        f"node {peer.address} stopped answering (silent for {silent:.1f} s, "
                        f"peer_timeout={self.peer_timeout} s)"))
                elif ping:
                    peer.ping()

    def close(self) -> None:
        self._closed = True
        for peer in list(self._peers.values()):
            peer.close()
        if self._router is not None:
            self._router.close()
            self._router = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        # destroy, not term: a socket leaked by some failure path must not hang the exit
        self.context.destroy(linger=0)


class _KeyCheck:
    """ZAP credentials provider: a client's CURVE public key must be in the allow-list."""

    def __init__(self, allowed: set[str]) -> None:
        self._allowed = allowed

    def callback(self, domain: str, key: bytes) -> bool:
        ok = key.decode("ascii", "replace") in self._allowed
        if not ok:
            log.warning("refused a CURVE client whose key is not allowed")
        return ok


def new_node_id() -> str:
    return uuid.uuid4().hex[:12]


def _remember(table: dict[bytes, Any], route: bytes, value: Any, limit: int) -> None:
    """``table[route] = value``, forgetting the oldest route once ``limit`` are kept."""
    if route not in table and len(table) >= limit:
        del table[next(iter(table))]
    table[route] = value
