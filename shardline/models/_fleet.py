"""The stage actors a ``Plan`` calls for: spawning them, linking them, and re-placing
the ones whose node was lost (``replace``), which is the plan's part that changed."""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import anyio
import torch
from torch import nn

from .. import ActorMesh, ActorRef, Node, NodeLost, RemoteNode, ShardlineError, to_thread
from ..transport import parse_tcp
from ._allreduce import master_store
from ._plan import LOCAL, DevicePlan, Place, Plan
from ._spec import LayerSpec
from ._stage import StageActor

__all__ = ["Fleet", "Replacements", "Saved", "StageOptions"]

log = logging.getLogger("shardline.models")


class Replacements(Protocol):
    """Hands back a node to replace a lost one: ``LocalCluster(restart=True)`` does,
    with the worker it restarted."""

    async def replacement(self, old: RemoteNode, *, timeout: float = ...) -> RemoteNode:
        ...


@dataclass(frozen=True)
class StageOptions:
    """What every stage actor is built with, besides its layers."""

    optimizer: tuple[str, dict[str, Any]] | None
    loss_fn: str | Callable[..., torch.Tensor] | None
    token: str
    cache_idle_s: float
    check_finite: bool
    wire_dtype: str | None = None


@dataclass(frozen=True)
class Saved:
    """A fleet as it was (``Fleet.checkpoint``)."""

    plan: Plan
    refs: dict[tuple[int, int], ActorRef]
    holders: dict[str, ActorRef]


class Fleet:
    """Owns the actors of one pipeline: ``refs[(replica, device)]`` and the snapshot
    holders (one per node that holds any)."""

    def __init__(self, node: Node, plan: Plan, model: LayerSpec | list[nn.Module],
                 options: StageOptions, nodes: dict[str, RemoteNode],
                 replacements: Replacements | None = None,
                 replacement_timeout: float = 60.0) -> None:
        self.node = node
        self.plan = plan
        self.replacements = replacements
        self.replacement_timeout = replacement_timeout
        self.model = model
        self.options = options
        self.nodes = dict(nodes)  # address -> RemoteNode, spares included
        self.refs: dict[tuple[int, int], ActorRef] = {}
        self.holders: dict[str, ActorRef] = {}
        self._store: Any = None  # rendezvous of the replicas' gradient groups
        self._generation = 0

    def replica(self, r: int) -> list[ActorRef]:
        return [self.refs[(r, d)] for d in range(self.plan.n_devices)]

    def all_refs(self) -> list[ActorRef]:
        return [self.refs[dev.key] for dev in self.plan.all_devices()]

    @staticmethod
    def snapshot_key(dev: DevicePlan) -> str:
        return f"r{dev.replica}d{dev.index}"

    # -- building -------------------------------------------------------------------------

    async def start(self, snapshots: bool) -> None:
        """Spawn every device (in parallel: a fresh worker spends seconds importing
        torch), then link them; with ``snapshots``, the holders too."""
        try:
            await self._spawn_all(self.plan.all_devices())
            await self.link()
            await self.form_groups()
            if snapshots:
                await self.ensure_holders()
            # A holder on every spare too: it makes the spare import torch and the
            # model layer now, not in the middle of a recovery.
            for spare in self.plan.spares:
                await self._holder(spare.node)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.stop()
            raise

    async def _spawn_all(self, devices: Sequence[DevicePlan]) -> None:
        errors: list[BaseException] = []

        async def one(dev: DevicePlan) -> None:
            try:
                self.refs[dev.key] = await self._spawn(dev)
            except Exception as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            for dev in devices:
                tg.start_soon(one, dev)
        if errors:
            raise errors[0]

    async def _spawn(self, dev: DevicePlan) -> ActorRef:
        plan, opts = self.plan, self.options
        last_here = (plan.n_stages - 1) in dev.stages
        kwargs: dict[str, Any] = {
            "device_index": dev.index, "replica": dev.replica, "stages": list(dev.stages),
            "n_stages": plan.n_stages,
            "bounds": [list(plan.bounds[s]) for s in dev.stages],
            "layer_names": [plan.names(s) for s in dev.stages],
            "optimizer": list(opts.optimizer) if opts.optimizer is not None else None,
            "loss_fn": opts.loss_fn if last_here else None,
            "token": opts.token,
            "cache_idle_s": opts.cache_idle_s,
            "check_finite": opts.check_finite,
            "device": dev.place.device,
            "wire_dtype": opts.wire_dtype,
        }
        if dev.place.node == LOCAL:
            if isinstance(self.model, LayerSpec):
                # built here: this process chose the spec, nothing to allow
                spec = self.model
                kwargs["modules"] = [await to_thread(spec.build, *plan.bounds[s])
                                     for s in dev.stages]
            else:
                modules = [nn.Sequential(*self.model[slice(*plan.bounds[s])])
                           for s in dev.stages]
                # replica 0 trains the caller's own layers; the others, copies
                kwargs["modules"] = modules if dev.replica == 0 else copy.deepcopy(modules)
            return await self.node.spawn(StageActor, **kwargs)
        if last_here and opts.loss_fn is not None and not isinstance(opts.loss_fn, str):
            raise ValueError("a remote last stage needs loss_fn as an import path, e.g. "
                             "'torch.nn.functional:cross_entropy'")
        if not isinstance(self.model, LayerSpec):
            raise ValueError("an nn.Module can only be placed on this process's devices; "
                             "describe it with a LayerSpec to place stages on other nodes")
        kwargs["spec"] = self.model.to_wire()
        return await self.nodes[dev.place.node].spawn("shardline.models._stage:StageActor",
                                                      **kwargs)

    async def link(self) -> None:
        """Tell every device where each stage of its replica takes its inputs."""
        addresses = {key: await ref.link_address() for key, ref in self.refs.items()}
        schedule = self.plan.schedule
        for dev in self.plan.all_devices():
            links = [addresses[(dev.replica, schedule.device_of(s))]
                     for s in range(schedule.n_stages)]
            await self.refs[dev.key].connect(links)

    async def form_groups(self, timeout: float = 60.0) -> None:
        """With replicas: each device joins a process group with its copies in the other
        replicas (afresh after a recovery: a group cannot change its members)."""
        replicas = self.plan.replicas
        if replicas == 1:
            return
        host = "127.0.0.1"
        if self.node.address.startswith("tcp://"):
            host, _ = parse_tcp(self.node.address)
        if self._store is None:
            self._store = await to_thread(master_store, host, timeout)
        self._generation += 1
        port = int(self._store.port)
        prefix = f"{self.options.token}/g{self._generation}"

        async def join(index: int) -> None:
            # the copies of device ``index`` form a mesh; each joins as its replica's rank
            siblings = ActorMesh([self.refs[(r, index)] for r in range(replicas)])
            await siblings.call("join_replicas", host, port, f"{prefix}/d{index}", replicas,
                                timeout)

        async with anyio.create_task_group() as tg:
            for index in range(self.plan.n_devices):
                tg.start_soon(join, index)

    async def ensure_holders(self) -> None:
        """A ``SnapshotHolder`` on every node the plan keeps snapshots on."""
        for address in sorted({d.holder for d in self.plan.all_devices()
                               if d.holder is not None}):
            await self._holder(address)

    async def _holder(self, address: str) -> ActorRef:
        ref = self.holders.get(address)
        if ref is None:
            ref = self.holders[address] = await self.nodes[address].spawn(
                "shardline.models._snapshot:SnapshotHolder")
        return ref

    # -- failures ---------------------------------------------------------------------------

    async def lost_nodes(self, timeout: float) -> set[str]:
        """Nodes of the plan whose actors do not answer within ``timeout`` seconds."""
        lost: set[str] = set()
        targets = [(dev.place.node, self.refs[dev.key], "alive")
                   for dev in self.plan.all_devices() if dev.key in self.refs]
        targets += [(address, ref, "nbytes") for address, ref in self.holders.items()]

        async def probe(address: str, ref: ActorRef, method: str) -> None:
            if address == LOCAL:
                return
            try:
                await ref.ask(method, timeout=timeout)
            except ShardlineError:  # lost, silent, or its actor gone: all the same here
                lost.add(address)

        async with anyio.create_task_group() as tg:
            for address, ref, method in targets:
                tg.start_soon(probe, address, ref, method)
        return lost

    def can_replace(self) -> bool:
        return bool(self.plan.spares) or self.replacements is not None

    async def replace(self, lost: set[str]) -> tuple[Plan, list[DevicePlan]]:
        """Re-place the devices on ``lost`` nodes (``Plan.replace``), spawn them, relink
        everything; returns the old plan and the devices that moved. With
        ``replacements``, each lost node is first replaced by the node they hand back
        (a restarted worker), which joins the spares."""
        old = self.plan
        if self.replacements is not None:
            fresh = []
            for address in sorted(lost):
                gone = self.nodes.get(address)
                if gone is None:
                    continue
                node = await self._replacement(gone)
                fresh.append(Place(node.address, "cpu"))
            old = replace(old, spares=(*old.spares, *fresh))
        new = old.replace(lost)
        moved = old.moved(new)
        for address in lost:
            self.holders.pop(address, None)
        for dev in moved:
            self.refs.pop(dev.key, None)
        self.plan = new
        await self._spawn_all(moved)
        await self.link()
        await self.form_groups()
        await self.ensure_holders()
        return old, moved

    async def _replacement(self, gone: RemoteNode, tries: int = 3) -> RemoteNode:
        """The node ``replacements`` hand back for ``gone``, with a holder on it (warm:
        torch imported before the spawn). One lost before it is used is replaced in
        turn: a cluster hands back its worker's newest process, which may itself have
        died and be restarting, and failing on it would only fail the rebuild."""
        assert self.replacements is not None
        first = gone.address
        for _ in range(tries):
            node = await self.replacements.replacement(
                gone, timeout=self.replacement_timeout)
            self.nodes[node.address] = node
            try:
                await self._holder(node.address)
            except NodeLost:
                log.info("the node replacing %s was lost as well (%s): waiting for its "
                         "replacement", first, node.address)
                gone = node
                continue
            return node
        raise NodeLost(f"{tries} nodes in a row replacing {first} were lost")

    def checkpoint(self) -> Saved:
        """What ``revert`` goes back to: the plan and the actors it names."""
        return Saved(self.plan, dict(self.refs), dict(self.holders))

    async def revert(self, saved: Saved, timeout: float = 5.0) -> None:
        """Back to ``saved`` after a ``replace`` that could not finish, and stop the
        actors spawned since. Its lost nodes are then still in the plan, with their
        dead actors: a call that reaches them fails at once and heals again. Never a
        half-moved replica: a new stage that its neighbours were never linked to would
        wait for inputs sent to the old one's address, forever."""
        spawned = [ref for key, ref in self.refs.items() if saved.refs.get(key) is not ref]
        spawned += [ref for address, ref in self.holders.items()
                    if saved.holders.get(address) is not ref]
        self.plan, self.refs, self.holders = saved.plan, dict(saved.refs), \
            dict(saved.holders)
        with anyio.CancelScope(shield=True), anyio.move_on_after(timeout):
            for ref in spawned:
                with contextlib.suppress(ShardlineError):  # on a node lost meanwhile
                    await ref.stop()

    async def stop(self) -> None:
        for ref in [*self.refs.values(), *self.holders.values()]:
            with contextlib.suppress(ShardlineError):  # already gone: nothing to stop
                await ref.stop()
