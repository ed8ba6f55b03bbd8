"""``Cluster``: the driver of a cluster whose workers dial in."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any

import anyio
from anyio.abc import TaskGroup

from .._errors import ClusterTimeout, ShardlineError
from ..transport import KeyPair, is_loopback
from ._hostinfo import describe
from ._join import JOIN_NAME, JoinActor, Roster, Seat
from ._launchers import Launch, read_launch
from ._node import Node
from ._remote import RemoteNode

__all__ = ["Cluster", "ranks_joined_here", "resolves_to_loopback"]

log = logging.getLogger("shardline.actors")

# Ranks that joined a Cluster in this process. ``shardline run`` reads it on rank 0
# after the script: ranks missing from it may still be waiting to join, and are told
# that the script has ended. (Process-wide on purpose: the script owns the Cluster.)
_JOINED_HERE: set[int] = set()


def ranks_joined_here() -> frozenset[int]:
    return frozenset(_JOINED_HERE)


class Cluster:
    """The driver of a cluster whose workers dial in.

    ``async with Cluster(expect=3, listen="tcp://0.0.0.0:5555", keys="keys/driver")
    as cluster`` listens, waits until ``expect`` workers (``shardline node --join``)
    have joined, and gives ``cluster.node`` (this process's node, rank 0) and
    ``cluster.nodes`` (one ``RemoteNode`` per worker, in rank order: ranks 1..expect).
    ``ClusterTimeout`` (a ``TimeoutError``) if they have not all joined within
    ``timeout`` seconds, saying who joined from where and who is missing.

    With ``keys``, only workers whose keys are in ``allow_keys`` (and this node's own
    key) get in; workers that call each other (pipeline stages do) must accept each
    other's keys too: one keypair shared by every rank is simplest.

    Leaving the block asks every worker to leave (they exit), then stops the node. A
    worker whose node is lost frees its rank: a worker that joins for it (a restarted
    one) takes its place in ``nodes``, and ``await cluster.replacement(old)`` returns it.
    """

    def __init__(self, expect: int, *, listen: str = "tcp://127.0.0.1:0",
                 keys: str | os.PathLike[str] | KeyPair | None = None,
                 allow_keys: Iterable[str | os.PathLike[str]] | None = None,
                 insecure: bool = False, advertise: str | None = None,
                 allow: Iterable[str] = (), timeout: float = 120.0,
                 peer_timeout: float = 5.0, connect_timeout: float = 10.0) -> None:
        if expect < 0:
            raise ValueError(f"expect must be >= 0 workers, got {expect}")
        self.expect = expect
        self.timeout = timeout
        self.launch: Launch | None = None
        """Set by ``from_env``: where this process stands in the launched job."""
        self.node = Node(listen, keys=keys, allow_keys=allow_keys, insecure=insecure,
                         advertise=advertise, allow=allow, peer_timeout=peer_timeout,
                         connect_timeout=connect_timeout)
        self.node.info["rank"] = 0
        self._roster = Roster(self.node, expect, connect_timeout=connect_timeout)
        self._history: dict[int, list[RemoteNode]] = {}
        self._tg: TaskGroup | None = None
        self._closing = False

    @classmethod
    def from_env(cls, *, timeout: float = 120.0, environ: Mapping[str, str] | None = None,
                 **kwargs: Any) -> Cluster:
        """The cluster of a job started with ``shardline run`` (on rank 0).

        Rank, world size and head address come from the launcher's variables (see
        docs/clusters.md for the order); keys from ``SHARDLINE_KEYS`` and
        ``--insecure`` from ``SHARDLINE_INSECURE=1``, both set by ``shardline run``.
        """
        env = os.environ if environ is None else environ
        launch = read_launch(env)
        if launch.rank != 0:
            raise RuntimeError(
                f"Cluster.from_env() runs on rank 0, and this process is {launch}; start "
                "the script on every rank with 'shardline run', which makes the other "
                "ranks workers")
        bind = "127.0.0.1" if resolves_to_loopback(launch.head_host) else "0.0.0.0"
        kwargs.setdefault("keys", env.get("SHARDLINE_KEYS") or None)
        kwargs.setdefault("insecure", env.get("SHARDLINE_INSECURE", "") in ("1", "true"))
        cluster = cls(launch.world_size - 1, listen=f"tcp://{bind}:{launch.head_port}",
                      advertise=launch.head, timeout=timeout, **kwargs)
        cluster.launch = launch
        cluster.node.info.update(describe(rank=0, local_rank=launch.local_rank,
                                          environ=env))
        return cluster

    @property
    def address(self) -> str:
        """Where workers join (``--join``), CURVE key included."""
        return self.node.address

    @property
    def nodes(self) -> list[RemoteNode]:
        """One node per worker, in rank order (``nodes[i].rank == i + 1``)."""
        seats = self._roster.seats
        return [seats[r].node for r in range(1, self.expect + 1) if r in seats]

    async def __aenter__(self) -> Cluster:
        await self.node.__aenter__()
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        self._roster.on_seated = self._seated
        try:
            await self.node.spawn(JoinActor, self._roster, name=JOIN_NAME)
            log.info("cluster driver at %s waiting for %d workers", self.address, self.expect)
            with anyio.move_on_after(self.timeout):
                while len(self._roster.live()) < self.expect:
                    await self._roster.changed.wait()
            joined = len(self._roster.live())
            if joined < self.expect:
                raise ClusterTimeout(
                    f"{joined} of {self.expect} expected workers joined the cluster at "
                    f"{self.address} within {self.timeout} s: {self._roster.describe()}")
        except BaseException:
            await self._shutdown()
            raise
        return self

    def _seated(self, seat: Seat) -> None:
        _JOINED_HERE.add(seat.rank)
        self._history.setdefault(seat.rank, []).append(seat.node)
        if self._tg is not None:
            self._tg.start_soon(self._watch, seat)

    async def _watch(self, seat: Seat) -> None:
        try:
            await self._roster.watch(seat)
        except Exception:
            log.exception("watching rank %d failed", seat.rank)

    async def replacement(self, old: RemoteNode, *, timeout: float = 60.0) -> RemoteNode:
        """The node that took ``old``'s rank after ``old`` was lost, once one has
        joined (``shardline run --restart`` restarts a dead worker, which rejoins with
        its rank). ``ClusterTimeout`` if none has within ``timeout`` seconds."""
        rank = next((r for r, nodes in self._history.items() if any(n is old for n in nodes)),
                    None)
        if rank is None:
            raise ValueError(f"{old!r} is not a worker of this cluster")
        with anyio.move_on_after(timeout):
            while True:
                seat = self._roster.seats.get(rank)
                if seat is not None and seat.node is not old and seat.ended is None:
                    return seat.node
                await self._roster.changed.wait()
        raise ClusterTimeout(f"no worker replaced rank {rank} ({old.address}) within "
                             f"{timeout} s")

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self._shutdown()

    async def _shutdown(self) -> None:
        self._closing = True
        tg, self._tg = self._tg, None
        try:
            if tg is not None:
                tg.cancel_scope.cancel()  # the watchers: losses from here on are expected
                await tg.__aexit__(None, None, None)
            with anyio.CancelScope(shield=True):
                async with anyio.create_task_group() as leaving:
                    for seat in self._roster.live():
                        leaving.start_soon(_leave, seat)
        finally:
            await self.node.__aexit__(None, None, None)

    def __repr__(self) -> str:
        return (f"<Cluster {self.address} {len(self._roster.live())}/{self.expect} "
                "workers>")


async def _leave(seat: Seat) -> None:
    with contextlib.suppress(ShardlineError, OSError):
        await seat.member.ask("leave", "the driver ended the cluster", timeout=2.0)


def resolves_to_loopback(host: str) -> bool:
    """Whether ``host`` names this machine's loopback interface only (``localhost``,
    127.0.0.1, or a hostname that /etc/hosts maps there): then a cluster can stay on
    loopback, where no keys are needed."""
    if is_loopback(host):
        return True
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addresses) and all(is_loopback(str(a)) for a in addresses)
