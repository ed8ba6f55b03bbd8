"""The client half of a connection: one DEALER to one peer node, its pending requests."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio
import zmq
from zmq.utils.monitor import parse_monitor_message

from .._errors import AskTimeout, NodeLost, ProtocolError, ShardlineError, Unauthorized
from ._address import parse_tcp
from ._codec import describe
from ._exchange import Link, exchange
from ._ipc import ipc_offer_usable
from ._loopsock import LoopSocket
from ._placement import message_size
from ._shmsock import is_id
from ._wire import PROTOCOL_VERSION, error_from_wire, salvage_id

if TYPE_CHECKING:
    from ._endpoint import Endpoint

__all__ = ["Peer"]

log = logging.getLogger("shardline.transport")

_HANDSHAKE_FAILED = frozenset({int(zmq.EVENT_HANDSHAKE_FAILED_AUTH),
                               int(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL),
                               int(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)})
_HANDSHAKE_SUCCEEDED = int(zmq.EVENT_HANDSHAKE_SUCCEEDED)
_DISCONNECTED = int(zmq.EVENT_DISCONNECTED)
_CONNECT_RETRIED = int(zmq.EVENT_CONNECT_RETRIED)
# A closed connection fails the peer after this long, so that a supervisor that knows
# why the process ended (Node._declare_lost) can name the cause to the pending asks.
DISCONNECT_GRACE = 0.2
# How long a hello over a node's ipc:// endpoint may take before the connection stays
# on TCP (the node answered over TCP just before: it is up).
IPC_HELLO_TIMEOUT = 1.0
_MONITORED = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
              | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_SUCCEEDED
              | zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED)


class Peer:
    """Requests to one remote node and their replies.

    One connection, one node: the peer is declared lost (and every pending request
    fails with ``NodeLost``) when the connection closes, when the node is silent for
    ``peer_timeout``, or when another node answers at its address. A lost peer is never
    revived; the endpoint opens a new one, with a new hello, on next use.
    """

    def __init__(self, endpoint: Endpoint, address: str, server_key: str | None) -> None:
        parse_tcp(address)  # a bad address is a ValueError before any socket exists
        self.endpoint = endpoint
        self.address = address
        self.node_id: str | None = None
        self.info: Any = None
        self._loop = asyncio.get_running_loop()
        self._ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.last_seen = time.monotonic()
        self.lost = anyio.Event()
        self.is_lost = False  # plain flag: checked on every ask
        self.lost_reason = ""
        self._on_lost: list[Callable[[Peer], None]] = []
        self._unacked: dict[int, int] = {}
        self._window_waiters: dict[int, list[asyncio.Future[None]]] = {}
        self.bytes_sent = 0
        self.bytes_received = 0
        # Shared memory toward the node, when its process is on this host (the hello
        # says): large buffers then go through it instead of the TCP connection.
        self.shm: Link | None = None
        # The node's shared-memory token (its hello says): the only process whose
        # segments its replies may name.
        self.shm_proc: int | None = None
        self._established = False  # a ZMTP handshake succeeded
        # Set during a reconnect: a refused connection then means the node is gone,
        # while a first connect waits (the node may still be starting).
        self._refused_is_lost = False
        self._closing: asyncio.TimerHandle | None = None  # a closed connection's fail
        self._monitor: LoopSocket | None = None
        self._server_key = server_key
        # Where the connection goes now: the node's TCP address, or its ipc:// endpoint
        # once a hello found both on one host (see _move_to_ipc).
        self.via = address
        dealer, monitor = self._open(address)
        try:
            self._monitor = LoopSocket(monitor, self._on_monitor, copied=2)
            self.sock = LoopSocket(dealer, self._on_message, copied=1)
        except BaseException:
            if self._monitor is not None:
                self._monitor.close()
            else:
                monitor.close(linger=0)
            dealer.close(linger=0)
            raise

    def _open(self, address: str) -> tuple[zmq.Socket[Any], zmq.Socket[Any]]:
        """A DEALER connecting to ``address`` and its monitor socket (kept for the
        connection's whole life: a closed connection is noticed at once)."""
        endpoint = self.endpoint
        dealer = endpoint.context.socket(zmq.DEALER)
        monitor: zmq.Socket[Any] | None = None
        try:
            endpoint.configure(dealer)
            if self._server_key is not None or endpoint.keys is not None:
                endpoint.make_curve_client(dealer, self._server_key)
            monitor = dealer.get_monitor_socket(_MONITORED)
            dealer.connect(address)
        except BaseException as exc:
            if monitor is not None:
                monitor.close(linger=0)
            dealer.close(linger=0)
            if isinstance(exc, zmq.ZMQError):
                raise ValueError(f"cannot connect to {address!r}: {exc.strerror}") from None
            raise
        return dealer, monitor

    # -- sending -----------------------------------------------------------------

    def request(self, header: dict[str, Any]) -> asyncio.Future[Any]:
        """Send a request; the future resolves with the reply's ``r`` or raises."""
        if self.is_lost:
            raise NodeLost(f"node {self.address} is lost ({self.lost_reason})")
        rid = next(self._ids)
        header["id"] = rid
        frames = self.endpoint.codec.encode(header, None, self.shm)
        self.bytes_sent += len(frames[0]) if len(frames) == 1 else message_size(frames)
        fut: asyncio.Future[Any] = self._loop.create_future()
        self.pending[rid] = fut
        self.sock.send(frames)
        return fut

    async def call(self, header: dict[str, Any], timeout: float | None) -> Any:
        fut = self.request(header)
        handle = None
        if timeout is not None:
            handle = self._loop.call_later(timeout, self._expire, fut, header, timeout)
        try:
            return await fut
        except asyncio.CancelledError:
            self.give_up(header)
            raise
        finally:
            if handle is not None:
                handle.cancel()

    def _expire(self, fut: asyncio.Future[Any], header: dict[str, Any], timeout: float) -> None:
        if not fut.done():
            fut.set_exception(AskTimeout(
                f"{_what(header)} to node {self.address} got no reply within {timeout} s"))
            self.give_up(header)

    def give_up(self, header: dict[str, Any]) -> None:
        """The caller of ``request(header)`` stopped waiting: tell the peer to drop (or
        cancel) the handler of a call nobody waits for."""
        rid = header["id"]
        if self.pending.pop(rid, None) is not None and header.get("k") == "call" \
                and not self.is_lost:
            self.sock.send(self.endpoint.codec.encode(
                {"v": PROTOCOL_VERSION, "k": "cancel", "id": rid}))

    async def tell(self, header: dict[str, Any], key: int, window: int) -> None:
        """Send a one-way message; returns once it is out, unless ``window`` earlier ones
        to the same ``key`` (actor) are not yet acknowledged. The receiver acknowledges
        once the message is in the actor's mailbox, so a full remote mailbox stops the
        sender here instead of growing memory on either side."""
        while self._unacked.get(key, 0) >= window:
            waiter = self._loop.create_future()
            self._window_waiters.setdefault(key, []).append(waiter)
            await waiter
        fut = self.request(header)
        self._unacked[key] = self._unacked.get(key, 0) + 1
        fut.add_done_callback(lambda f: self._acked(key, header, f))

    def _acked(self, key: int, header: dict[str, Any], fut: asyncio.Future[Any]) -> None:
        left = self._unacked[key] - 1
        if left:
            self._unacked[key] = left
        else:
            del self._unacked[key]
        waiters = self._window_waiters.pop(key, None)
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)
        if not fut.cancelled() and fut.exception() is not None:
            log.warning("%s to node %s failed: %s", _what(header), self.address,
                        fut.exception())

    def ping(self) -> None:
        self.sock.send(self.endpoint.codec.encode({"v": PROTOCOL_VERSION, "k": "ping"}))

    # -- receiving ---------------------------------------------------------------

    def _on_message(self, frames: list[Any]) -> bool:
        """Settle the request a reply answers; True if that woke its caller."""
        self.last_seen = time.monotonic()
        header = frames[0]
        if len(frames) == 1:
            self.bytes_received += len(header)
            buffers = []
        else:
            buffers = [f.buffer for f in frames[1:]]
            self.bytes_received += len(header) + sum(b.nbytes for b in buffers)
        try:
            msg = self.endpoint.codec.decode(header, buffers, self.shm_proc)
        except ProtocolError as exc:
            rid = salvage_id(header)
            fut = self.pending.pop(rid, None) if rid is not None else None
            if fut is not None and not fut.done():
                fut.set_exception(exc)
            log.warning("bad reply from %s: %s", self.address, exc)
            return fut is not None
        kind = msg.get("k")
        if kind == "pong":
            node = msg.get("node")
            if node is not None and self.node_id is not None and node != self.node_id:
                self.fail(NodeLost(
                    f"node {self.address} restarted: node {node} answers there now, not "
                    f"{self.node_id}; requests to the old node are lost"))
            return False
        fut = self.pending.pop(msg.get("id"), None)  # type: ignore[arg-type]
        if fut is None or fut.done():
            return False  # the caller gave up (timeout, cancel): a late reply is dropped
        if kind == "reply":
            fut.set_result(msg.get("r"))
        elif kind == "error":
            fut.set_exception(error_from_wire(msg.get("e")))
        else:
            fut.set_exception(ProtocolError(f"unexpected reply kind {kind!r}"))
        return True

    def _on_monitor(self, frames: list[Any]) -> None:
        event = int(parse_monitor_message(frames)["event"])
        if event in _HANDSHAKE_FAILED and self._refused_is_lost and not self._established:
            # Reconnecting to a lost node's address: whatever answers there now is not
            # that node (a loopback connect to a free ephemeral port can even reach
            # itself, which fails the handshake).
            self.fail(NodeLost(f"no node answers at {self.address} any more (the "
                               "connection handshake failed)"))
        elif event in _HANDSHAKE_FAILED:
            self.fail(Unauthorized(
                f"node {self.address} refused the CURVE handshake (no key, a key it does not "
                "allow, or a security mechanism that does not match its own)"))
        elif event == _HANDSHAKE_SUCCEEDED:
            self._established = True
        elif event == _DISCONNECTED and self._closing is None:
            # Replies to requests sent on this connection can no longer arrive: the
            # node answers on the connection a request came in on.
            self._closing = self._loop.call_later(DISCONNECT_GRACE, self.fail, NodeLost(
                f"the connection to node {self.address} closed (its process ended, or it "
                "dropped the connection)"))
        elif event == _CONNECT_RETRIED and self._refused_is_lost and not self._established:
            self.fail(NodeLost(f"nothing listens at {self.address} any more "
                               "(connection refused)"))

    # -- lifecycle ---------------------------------------------------------------

    async def hello(self, timeout: float, *, refused_is_lost: bool = False) -> None:
        """Check the protocol version and learn the node's id. ``refused_is_lost``: a
        refused connection fails at once (reconnecting to a node that was lost)."""
        self._refused_is_lost = refused_is_lost
        header = {"v": PROTOCOL_VERSION, "k": "hello", "node": self.endpoint.node_id,
                  "addr": self.endpoint.address}
        shm = self.endpoint.shm_info()
        if shm is not None:
            header["shm"] = shm
        try:
            info = await self.call(header, timeout)
        except AskTimeout:
            raise NodeLost(f"no answer from {self.address} within {timeout} s "
                           "(is a node listening there?)") from None
        if not isinstance(info, dict) or info.get("v") != PROTOCOL_VERSION:
            raise ProtocolError(f"node {self.address} speaks protocol "
                                f"{info.get('v') if isinstance(info, dict) else info!r}, "
                                f"this node speaks {PROTOCOL_VERSION}")
        node = info.get("node")
        if not isinstance(node, str):
            raise ProtocolError(f"node {self.address} sent a hello without a node id")
        self.node_id = node
        # what the node says about itself (host, pid, devices): the layers above read it
        self.info = info.get("info")
        if shm is not None:
            theirs = info.get("shm")
            proc = theirs.get("proc") if isinstance(theirs, dict) else None
            self.shm_proc = proc if is_id(proc) else None
            self.shm = exchange().link_to(theirs)
        self._refused_is_lost = False
        ipc = ipc_offer_usable(info.get("ipc"))
        if ipc is not None:
            await self._move_to_ipc(ipc, header, min(timeout, IPC_HELLO_TIMEOUT))

    async def _move_to_ipc(self, address: str, hello: dict[str, Any], timeout: float) -> None:
        """Move the connection to the node's ipc:// endpoint (same node, same host).

        Runs before the peer is handed to anyone, so nothing else is in flight on the
        TCP connection. A second hello over the new connection proves it reaches the
        same node (and registers it there, shared memory included); if it cannot
        connect (another network namespace), fails its handshake or gets no answer
        within ``timeout``, the connection stays on TCP."""
        try:
            dealer, monitor = self._open(address)
        except ValueError as exc:
            log.debug("staying on TCP to %s: %s", self.address, exc)
            return
        candidate = LoopSocket(dealer, self._on_message, copied=1)
        rid = next(self._ids)
        fut: asyncio.Future[Any] = self._loop.create_future()
        watch = LoopSocket(monitor, lambda frames: _trial_event(frames, fut, address),
                           copied=2)
        self.pending[rid] = fut
        moved = False
        try:
            candidate.send(self.endpoint.codec.encode({**hello, "id": rid}, None, self.shm))
            answer = await asyncio.wait_for(fut, timeout)
            if not isinstance(answer, dict) or answer.get("node") != self.node_id:
                raise ProtocolError(f"{address} is not node {self.node_id}")
            if self.is_lost:
                return
            watch.handle_with(self._on_monitor)
            self._stop_monitor()
            self.sock.close()
            self.sock, self._monitor, self.via = candidate, watch, address
            moved = True
        except (ShardlineError, TimeoutError, asyncio.TimeoutError) as exc:  # distinct before 3.11
            log.debug("staying on TCP to %s: %s", self.address,
                      str(exc) or f"no answer over ipc within {timeout} s")
        finally:
            self.pending.pop(rid, None)
            if not moved:
                with contextlib.suppress(zmq.ZMQError):  # the node may be closing
                    dealer.disable_monitor()
                watch.close()
                candidate.close()

    def _stop_monitor(self) -> None:
        if self._monitor is not None:
            self.sock.sock.disable_monitor()
            self._monitor.close()
            self._monitor = None

    def on_lost(self, callback: Callable[[Peer], None]) -> None:
        self._on_lost.append(callback)

    def fail(self, error: ShardlineError) -> None:
        """Declare the peer lost: every pending request fails with ``error``."""
        if self.is_lost:
            return
        self.is_lost = True
        if self._closing is not None:
            self._closing.cancel()
        self.lost_reason = str(error)
        self.lost.set()
        self._stop_monitor()
        self.sock.close()
        pending, self.pending = self.pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(error)
        for callback in self._on_lost:
            try:
                callback(self)
            except Exception:
                log.exception("peer-lost callback raised")
        self.endpoint.forget(self)

    def close(self) -> None:
        self.fail(NodeLost(f"connection to {self.address} closed"))

    def __repr__(self) -> str:
        state = "lost" if self.is_lost else "alive"
        return f"<Peer {self.address} {state}, {len(self.pending)} pending>"


def _trial_event(frames: list[Any], hello: asyncio.Future[Any], address: str) -> None:
    """Monitor events of a connection being tried (``Peer._move_to_ipc``): a refused
    connect or a failed handshake ends the try at once instead of at its timeout."""
    event = int(parse_monitor_message(frames)["event"])
    if hello.done():
        return
    if event == _CONNECT_RETRIED:
        hello.set_exception(NodeLost(f"cannot connect to {address}"))
    elif event in _HANDSHAKE_FAILED:
        hello.set_exception(Unauthorized(f"handshake over {address} failed"))


_what = describe
