"""``ActorMesh``: actors of one kind on several nodes, called together.

``await node.spawn_many(cls, nodes, *args)`` puts one actor on each node, in parallel;
``await mesh.call("method", ...)`` asks all of them at once and gathers the results in
rank order (the order of ``nodes``), as Monarch's meshes and Ray's actor pools do. A
failure is raised once every member answered, naming the member that failed.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import anyio

from .._errors import ShardlineError
from ._actor import Actor
from ._ref import ActorRef
from ._remote import RemoteNode

if TYPE_CHECKING:
    from ._node import Node

__all__ = ["ActorMesh", "MeshError", "spawn_many"]


class MeshError(ShardlineError):
    """A member of a mesh failed. ``member`` is its rank, ``errors`` every member's
    failure by rank; the first one is ``__cause__``."""

    def __init__(self, message: str, member: int, errors: dict[int, BaseException]) -> None:
        super().__init__(message)
        self.member = member
        self.errors = errors


class ActorMesh:
    """One actor per rank. ``mesh[i]`` is rank ``i``'s ref."""

    def __init__(self, refs: Sequence[ActorRef]) -> None:
        self.refs = list(refs)

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, rank: int) -> ActorRef:
        return self.refs[rank]

    def __iter__(self) -> Iterator[ActorRef]:
        return iter(self.refs)

    async def call(self, method: str, *args: Any, timeout: float | None = None,
                   **kwargs: Any) -> list[Any]:
        """Ask every member ``method(*args, **kwargs)`` at once; results in rank order."""
        results: list[Any] = [None] * len(self.refs)
        errors: dict[int, BaseException] = {}

        async def one(rank: int, ref: ActorRef) -> None:
            try:
                results[rank] = await ref.ask(method, *args, timeout=timeout, **kwargs)
            except Exception as exc:
                errors[rank] = exc

        async with anyio.create_task_group() as tg:
            for rank, ref in enumerate(self.refs):
                tg.start_soon(one, rank, ref)
        if errors:
            raise _failure(f"{method!r}", self.refs, errors)
        return results

    async def tell(self, method: str, *args: Any, **kwargs: Any) -> None:
        """Send ``method(*args, **kwargs)`` to every member without waiting for it."""
        for ref in self.refs:
            await ref.tell(method, *args, **kwargs)

    async def stop(self) -> None:
        """Stop every member (those already gone are skipped)."""
        for ref in self.refs:
            with contextlib.suppress(ShardlineError):
                await ref.stop()

    def __repr__(self) -> str:
        return f"<ActorMesh of {len(self.refs)}>"


def _resolve(path: str) -> type[Actor]:
    module, _, name = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, Actor)):
        raise TypeError(f"{path} is not a shardline.Actor subclass")
    return obj


def _failure(what: str, refs: Sequence[Any], errors: dict[int, BaseException]) -> MeshError:
    rank = min(errors)
    first = errors[rank]
    others = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    error = MeshError(f"{what} failed on member {rank} of {len(refs)} ({refs[rank]!r}): "
                      f"{type(first).__name__}: {first}{others}", rank, errors)
    error.__cause__ = first
    return error


async def spawn_many(cls: type[Actor] | str, nodes: Sequence[Node | RemoteNode],
                     *args: Any, **kwargs: Any) -> ActorMesh:
    """One actor from ``cls(*args, **kwargs)`` on each of ``nodes``, spawned in
    parallel. ``cls`` is a class (for local nodes) or ``"pkg.module:Class"`` (any
    node). If any spawn fails, the others are stopped and a ``MeshError`` names it."""
    if not nodes:
        raise ValueError("spawn_many needs at least one node")
    refs: list[ActorRef | None] = [None] * len(nodes)
    errors: dict[int, BaseException] = {}

    async def one(rank: int, where: Node | RemoteNode) -> None:
        try:
            if isinstance(where, RemoteNode):
                path = cls if isinstance(cls, str) else f"{cls.__module__}:{cls.__qualname__}"
                refs[rank] = await where.spawn(path, *args, **kwargs)
            else:
                # this process chose the path: no allow-list applies to its own node
                local = _resolve(cls) if isinstance(cls, str) else cls
                refs[rank] = await where.spawn(local, *args, **kwargs)
        except Exception as exc:
            errors[rank] = exc

    async with anyio.create_task_group() as tg:
        for rank, where in enumerate(nodes):
            tg.start_soon(one, rank, where)
    if errors:
        await ActorMesh([r for r in refs if r is not None]).stop()
        raise _failure("spawn", list(nodes), errors)
    return ActorMesh([r for r in refs if r is not None])
