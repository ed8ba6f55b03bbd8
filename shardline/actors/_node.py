"""``Node``: owns actors, their names and the task group they run in."""

from __future__ import annotations

import itertools
import logging
import uuid
from types import TracebackType
from typing import Any

import anyio
from anyio.abc import TaskGroup

from .._errors import ActorNameTaken, ActorNotFound
from ._actor import Actor
from ._cell import ActorCell
from ._lifecycle import OnError, RestartPolicy
from ._ref import ActorRef

__all__ = ["Node"]

log = logging.getLogger("shardline.actors")


class Node:
    """A home for actors. Use as ``async with Node() as node:``.

    Leaving the block stops every actor gracefully (``on_stop`` runs); an actor still
    busy after ``stop_timeout`` seconds is cancelled.
    """

    def __init__(self, *, stop_timeout: float = 5.0) -> None:
        self.node_id = uuid.uuid4().hex[:12]
        self.address = f"inproc://{self.node_id}"
        self.stop_timeout = stop_timeout
        self._ids = itertools.count(1)
        self._cells: dict[int, ActorCell] = {}
        self._names: dict[str, ActorCell | None] = {}  # None: reserved while starting
        self._tg: TaskGroup | None = None
        self._closing = False

    async def __aenter__(self) -> Node:
        if self._tg is not None:
            raise RuntimeError("this Node is already running")
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> bool | None:
        tg = self._tg
        assert tg is not None
        self._closing = True
        with anyio.CancelScope(shield=True):
            await self._stop_all()
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
        if name is not None:
            if name in self._names:
                raise ActorNameTaken(f"an actor named {name!r} already lives on this node")
            self._names[name] = None
        try:
            actor_id = next(self._ids)
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
        """A snapshot for dashboards and debugging: one entry per live actor."""
        return {
            "address": self.address,
            "actors": [cell.statistics() for cell in self._cells.values()],
        }

    def _forget(self, cell: ActorCell) -> None:
        self._cells.pop(cell.ref.actor_id, None)
        if cell.ref.name is not None and self._names.get(cell.ref.name) is cell:
            del self._names[cell.ref.name]

    def __repr__(self) -> str:
        state = "running" if self._tg is not None else "idle"
        return f"<Node {self.address} {state}, {len(self._cells)} actors>"
