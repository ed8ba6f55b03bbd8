"""Joining a cluster: workers dial the driver; both halves of the protocol.

It is made of actors and ordinary asks, nothing new on the wire. The driver runs a
``JoinActor`` named ``shardline.join``; a worker spawns a local ``Member`` actor, looks
the join actor up and asks ``join({"address", "node", "rank", "info"}, member_ref)``.
The driver checks the request, connects back to the worker's address (so a worker that
advertises an address the driver cannot reach is told so at once), and answers
``{"rank": r, "world_size": n}`` or ``{"refused": why, "ended": bool}``: a refusal is
an answer, not a failure, and changes nothing on the driver.

Afterwards each side watches the other's actor: the worker exits when the join actor
stops (the driver ended) or its node is lost; the driver frees a rank whose member's
node is lost, so a restarted worker can take it again. A supervisor that saw its
worker's process end reports it (``lost(rank, pid, cause)``) so the driver fails asks
to it at once. At the end the driver asks every member to ``leave``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from .._errors import (
    ActorNotFound,
    ClusterTimeout,
    JoinRefused,
    NodeLost,
    ProtocolError,
    ShardlineError,
)
from ..transport import parse_tcp
from ._actor import Actor
from ._hostinfo import parse_info
from ._lifecycle import StopReason
from ._ref import ActorRef
from ._remote import RemoteNode

if TYPE_CHECKING:
    from ._node import Node

__all__ = ["JOIN_NAME", "JoinActor", "Member", "Membership", "Roster", "Seat",
           "join"]

log = logging.getLogger("shardline.actors")

JOIN_NAME = "shardline.join"
# How long a worker keeps looking for the join actor on a node that answers without one
# (the driver spawns it right after it starts listening).
_NO_JOIN_ACTOR_GRACE = 5.0
_REFUSALS_KEPT = 20


# -- the driver's half ---------------------------------------------------------------------

@dataclass
class Seat:
    """One joined worker as the driver sees it."""

    rank: int
    node: RemoteNode
    member: ActorRef
    ended: str | None = None
    """Why its node is gone, once it is; the rank is then free for a replacement."""


class Roster:
    """Who has joined: ranks 1..``expect`` (the driver is rank 0). Owned by a
    ``Cluster``; its ``JoinActor`` calls ``admit`` and ``report``."""

    def __init__(self, node: Node, expect: int, *, connect_timeout: float = 10.0,
                 ended: str | None = None) -> None:
        self.node = node
        self.expect = expect
        self.connect_timeout = connect_timeout
        self.ended = ended
        """Set on a roster that only tells latecomers the driver's script has ended."""
        self.seats: dict[int, Seat] = {}
        self.told: set[int | None] = set()  # ranks told ``ended``
        self.refusals: list[str] = []
        self.changed = anyio.Event()        # set (and replaced) on every join or loss
        self._joining: dict[int, str] = {}  # rank -> node id, while connecting back
        self.on_seated: Callable[[Seat], None] | None = None

    def live(self) -> list[Seat]:
        return [s for s in self.seats.values() if s.ended is None]

    def _notify(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()

    def _refuse(self, where: str, why: str, *, ended: bool = False) -> dict[str, Any]:
        log.warning("refused a worker at %s: %s", where, why)
        self.refusals = [*self.refusals[-_REFUSALS_KEPT + 1:], f"{where} ({why})"]
        return {"refused": why, "ended": ended}

    async def admit(self, request: Any, member: Any) -> dict[str, Any]:
        """Check a join request, connect back, seat the worker; the answer to send."""
        where = str(request.get("address"))[:200] if isinstance(request, dict) else "?"
        try:
            address, node_id, rank = _check_request(request, member)
        except ValueError as exc:
            return self._refuse(where, f"malformed join request: {exc}")
        if self.ended is not None:
            self.told.add(rank)
            self._notify()
            return {"refused": self.ended, "ended": True}
        for seat in self.live():
            if seat.node.node_id == node_id:
                return self._refuse(where, f"node {node_id} already joined as rank {seat.rank}")
        if node_id in self._joining.values():
            return self._refuse(where, f"node {node_id} is already joining")
        free = [r for r in range(1, self.expect + 1)
                if r not in self._joining and (r not in self.seats or self.seats[r].ended)]
        if rank is None:
            if not free:
                return self._refuse(where, f"the cluster has all {self.expect} workers "
                                    "it expects")
            rank = free[0]
        elif not 1 <= rank <= self.expect:
            return self._refuse(where, f"rank {rank} is outside 1..{self.expect} (the "
                                f"driver is rank 0 and expects {self.expect} workers)")
        elif rank not in free:
            holder = self.seats.get(rank)
            taker = holder.node.address if holder else self._joining.get(rank)
            return self._refuse(where, f"rank {rank} is already taken by {taker}")
        self._joining[rank] = node_id
        try:
            try:
                node = await self.node.connect(address, timeout=self.connect_timeout)
            except (ShardlineError, OSError, ValueError) as exc:
                return self._refuse(where, f"the driver could not reach you at {address}: "
                                    f"{exc} (check the worker's --listen/--advertise)")
            if node.node_id != node_id:
                return self._refuse(where, f"the node at {address} is {node.node_id}, not "
                                    f"{node_id}")
            # What the worker said about itself in the join (its hello said the same).
            said = parse_info(request.get("info"))
            node.host, node.pid = said["host"] or node.host, said["pid"] or node.pid
            node.devices, node.local_rank = said["devices"], said["local_rank"]
            node.rank = rank
            seat = self.seats[rank] = Seat(rank, node, member)
        finally:
            del self._joining[rank]
        if self.on_seated is not None:
            self.on_seated(seat)
        log.info("rank %d joined from %s (host %s, pid %s, devices %s)", rank, address,
                 node.host, node.pid, ",".join(node.devices))
        self._notify()
        return {"rank": rank, "world_size": self.expect + 1}

    def vacate(self, seat: Seat, why: str) -> None:
        """``seat``'s node is gone: fail asks to it now and free its rank."""
        if seat.ended is not None or self.seats.get(seat.rank) is not seat:
            return
        seat.ended = why
        seat.node._ended = why
        self.node._declare_lost(seat.node.address, NodeLost(why))
        log.warning("%s", why)
        self._notify()

    def report(self, rank: Any, pid: Any, cause: Any) -> bool:
        """A supervisor saw the process of worker ``rank`` end."""
        seat = self.seats.get(rank) if isinstance(rank, int) else None
        if seat is None or seat.node.pid != pid:
            return False  # stale or unknown: that process is not the rank's member
        why = (f"worker rank {rank} (pid {pid} on {seat.node.host}, {seat.node.address}) "
               f"{str(cause)[:500]}")
        if seat.ended is not None:
            # Its loss was noticed first (a closed connection); from now on say why.
            seat.ended = seat.node._ended = why
            return True
        self.vacate(seat, why)
        return True

    async def watch(self, seat: Seat) -> None:
        """Free ``seat`` once its member stops for good (its node was lost)."""
        info = await seat.member.wait_stopped()
        if info.reason is StopReason.NODE_LOST:
            self.vacate(seat, f"worker rank {seat.rank} (pid {seat.node.pid} on "
                              f"{seat.node.host}, {seat.node.address}) was lost: {info.error}")

    def describe(self) -> str:
        """Who joined and from where, who is missing, who was refused: for errors."""
        joined = [f"rank {s.rank} from {s.node.address} (host {s.node.host}, pid "
                  f"{s.node.pid})" for s in sorted(self.live(), key=lambda s: s.rank)]
        missing = [str(r) for r in range(1, self.expect + 1)
                   if r not in self.seats or self.seats[r].ended]
        text = "; ".join(joined) if joined else "none joined"
        if missing:
            text += f"; missing rank{'s' if len(missing) > 1 else ''} {', '.join(missing)}"
        if self.refusals:
            text += "; refused: " + "; ".join(self.refusals)
        return text


def _check_request(request: Any, member: Any) -> tuple[str, str, int | None]:
    if not isinstance(request, dict):
        raise ValueError(f"expected a map, got {type(request).__name__}")
    address, node_id, rank = request.get("address"), request.get("node"), request.get("rank")
    if not isinstance(address, str) or not isinstance(node_id, str) or not node_id:
        raise ValueError("address and node must be strings")
    parse_tcp(address)  # ValueError says what is wrong with it
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool)):
        raise ValueError(f"rank must be an integer, got {rank!r:.50}")
    if not isinstance(member, ActorRef):
        raise ValueError("the second argument must be the worker's member actor ref")
    return address, node_id, rank


class JoinActor(Actor):
    """The driver's door: ``join`` seats a worker, ``lost`` reports a dead one."""

    # Joins run concurrently: each waits for its connect-back handshake.
    max_concurrency = 256

    def __init__(self, roster: Roster) -> None:
        self._roster = roster

    async def join(self, request: Any, member: Any = None) -> dict[str, Any]:
        return await self._roster.admit(request, member)

    def lost(self, rank: Any, pid: Any, cause: Any) -> bool:
        return self._roster.report(rank, pid, cause)


# -- the worker's half ---------------------------------------------------------------------

class Member(Actor):
    """A worker's end of its membership; the driver calls ``leave`` when it is done."""

    def __init__(self, left: anyio.Event, reasons: list[str]) -> None:
        self._left = left
        self._reasons = reasons

    def leave(self, reason: str = "the driver ended the cluster") -> None:
        self._reasons.append(str(reason)[:500])
        self._left.set()


@dataclass
class Membership:
    """A worker's seat in a cluster, as ``join`` returns it."""

    rank: int
    world_size: int
    driver: str
    _join: ActorRef
    _left: anyio.Event
    _reasons: list[str]

    async def wait_end(self) -> tuple[str, bool]:
        """Wait until the membership ends; return (why, whether the driver was lost)."""
        ending: list[tuple[str, bool]] = []
        async with anyio.create_task_group() as tg:
            async def told() -> None:
                await self._left.wait()
                ending.append((self._reasons[-1], False))
                tg.cancel_scope.cancel()

            async def watched() -> None:
                try:
                    info = await self._join.wait_stopped()
                    lost = info.reason is StopReason.NODE_LOST
                    why = info.error
                except ShardlineError as exc:  # an answer that makes no sense: gone too
                    lost, why = True, str(exc)
                ending.append((f"the driver at {self.driver} was lost ({why})" if lost
                               else "the driver stopped", lost))
                tg.cancel_scope.cancel()

            tg.start_soon(told)
            tg.start_soon(watched)
        return ending[0]


async def join(node: Node, driver: str, *, rank: int | None = None,
               timeout: float = 120.0) -> Membership:
    """Join the cluster whose driver listens at ``driver``; ``node`` must listen.

    Waits up to ``timeout`` seconds for the driver to come up. Raises ``JoinRefused``
    (the driver said no, and why), ``Unauthorized`` (its CURVE handshake refused our
    key) or ``ClusterTimeout`` (no driver answered).
    """
    if node.address.startswith("inproc://"):
        raise ValueError("a joining node must listen (Node(listen='tcp://...'))")
    left, reasons = anyio.Event(), list[str]()
    ref = await node.spawn(Member, left, reasons)
    try:
        node.info["rank"] = rank
        deadline = anyio.current_time() + timeout
        join_ref = await _find_join_actor(node, driver, deadline, timeout)
        request = {"address": node.address, "node": node.node_id, "rank": rank,
                   "info": node.info}
        answer = await join_ref.ask("join", request, ref, timeout=60.0)
        if not isinstance(answer, dict):
            raise ProtocolError(f"the driver at {driver} answered the join with "
                                f"{answer!r:.100}")
        if "refused" in answer:
            raise JoinRefused(f"the driver at {driver} refused this node: "
                              f"{answer['refused']}", ended=bool(answer.get("ended")))
        got, world = answer.get("rank"), answer.get("world_size")
        if not isinstance(got, int) or not isinstance(world, int):
            raise ProtocolError(f"the driver at {driver} answered the join with "
                                f"{answer!r:.100}")
    except BaseException:
        with anyio.CancelScope(shield=True):
            await ref.stop()   # no membership: no member
        raise
    node.info["rank"] = got
    return Membership(got, world, driver, join_ref, left, reasons)


async def _find_join_actor(node: Node, driver: str, deadline: float,
                           timeout: float) -> ActorRef:
    first_answer: float | None = None
    while True:
        remaining = deadline - anyio.current_time()
        if remaining <= 0:
            raise ClusterTimeout(f"no cluster driver answered at {driver} within {timeout} s")
        try:
            return await node.lookup(driver, JOIN_NAME, timeout=remaining)
        except ActorNotFound:
            now = anyio.current_time()
            first_answer = first_answer if first_answer is not None else now
            if now - first_answer > _NO_JOIN_ACTOR_GRACE:
                raise JoinRefused(f"the node at {driver} is not a cluster driver (it has "
                                  f"no {JOIN_NAME!r} actor)") from None
            await anyio.sleep(0.05)
        except NodeLost as exc:
            if anyio.current_time() < deadline:
                await anyio.sleep(0.1)  # it went away while we connected: try again
                continue
            raise ClusterTimeout(f"no cluster driver answered at {driver} within "
                                 f"{timeout} s ({exc})") from None
