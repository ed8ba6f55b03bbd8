"""What a stage actor keeps besides its layers' code: reading and writing its weights and
optimizer state, and the in-memory snapshots self-healing restores from (``_snapshot``).

Every read and write runs on the device thread (``_on_device``), between steps, never
in the middle of one device's forward or optimizer step.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

from .. import ActorRef
from ._device import Device
from ._snapshot import State, Versions, in_shared_memory, pack, unpack

__all__ = ["StageState", "settle"]

T = TypeVar("T")


class StageState:
    """The state half of ``StageActor`` (which sets these attributes)."""

    stages: list[int]
    chunks: dict[int, nn.Module]
    names: dict[int, list[str]]
    optimizer: torch.optim.Optimizer | None
    version: int
    _snapshots: Versions
    _captures: dict[int, asyncio.Future[None]]
    _later_spans: list[list[Any]]
    _device: Device | None

    @property
    def link(self) -> Device:
        """The device thread and its links to the neighbouring stages."""
        if self._device is None:
            raise RuntimeError("the stage has not started")
        return self._device

    async def _on_device(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the device thread, after the jobs already queued there: between
        steps, never in the middle of one device's forward or optimizer step."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()

        def job() -> None:
            try:
                result = fn()
            except BaseException as exc:  # handed to the awaiting task, not lost
                settle(loop, done, None, exc)
            else:
                settle(loop, done, result, None)

        self.link.submit(job)
        return await done

    # -- state -----------------------------------------------------------------------------

    async def state_dict(self) -> dict[str, torch.Tensor]:
        """This device's parameters and buffers under the unsharded model's keys."""
        return await self._on_device(self._state_dict)

    def _state_dict(self, into: dict[str, torch.Tensor] | None = None
                    ) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for s in self.stages:
            names = self.names[s]
            for key, value in self.chunks[s].state_dict().items():
                index, _, rest = key.partition(".")
                name = f"{names[int(index)]}.{rest}"
                out[name] = _copy(value, into.get(name) if into is not None else None)
        return out

    async def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        await self._on_device(functools.partial(self._load_state_dict, state))

    def _load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.link.run_later()  # a deferred snapshot reads the state replaced here
        for s in self.stages:
            names = self.names[s]
            local = {}
            for key in self.chunks[s].state_dict():
                index, _, rest = key.partition(".")
                local[key] = state[f"{names[int(index)]}.{rest}"]
            self.chunks[s].load_state_dict(local)

    def _param_names(self) -> list[str]:
        names = []
        for s in self.stages:
            for key, _ in self.chunks[s].named_parameters():
                index, _, rest = key.partition(".")
                names.append(f"{self.names[s][int(index)]}.{rest}")
        return names

    async def optimizer_state(self) -> dict[str, Any]:
        """Optimizer state keyed by unsharded parameter name, so a checkpoint does not
        depend on how the model was split."""
        return await self._on_device(self._optimizer_state)

    def _optimizer_state(self, into: dict[str, torch.Tensor] | None = None
                         ) -> dict[str, Any]:
        if self.optimizer is None:
            return {"tensors": {}, "groups": []}
        sd = self.optimizer.state_dict()
        names = self._param_names()
        tensors: dict[str, torch.Tensor] = {}
        for index, fields in sd["state"].items():
            for field, value in fields.items():
                t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
                key = f"{names[index]}::{field}"
                tensors[key] = _copy(t, into.get(key) if into is not None else None)
        groups = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
        return {"tensors": tensors, "groups": groups}

    async def load_optimizer_state(self, tensors: dict[str, torch.Tensor],
                                   groups: list[dict[str, Any]]) -> None:
        await self._on_device(functools.partial(self._load_optimizer_state, tensors, groups))

    def _load_optimizer_state(self, tensors: dict[str, torch.Tensor],
                              groups: list[dict[str, Any]]) -> None:
        self.link.run_later()
        if self.optimizer is None:
            return
        sd = self.optimizer.state_dict()
        names = self._param_names()
        state: dict[int, dict[str, Any]] = {}
        for index, name in enumerate(names):
            prefix = f"{name}::"
            fields = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if fields:
                state[index] = fields
        for group, saved in zip(sd["param_groups"], groups, strict=False):
            group.update({k: v for k, v in saved.items() if k != "params"})
        self.optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})

    # -- snapshots and recovery ---------------------------------------------------------------

    def _capture(self, into: State | None = None) -> State:
        """Device thread: everything a restored copy needs to continue bitwise; copied
        into ``into``'s tensors when it holds the same ones (an earlier capture)."""
        state: State | None = None
        if into is not None and "segment" in into:
            state = {"model": self._state_dict(into["model"]),
                     "opt": self._optimizer_state(into["opt"]["tensors"])}
            if _filled(state, into):
                state["segment"] = into["segment"]
            else:
                # The buffers no longer fit (the optimizer's state appears at its first
                # step, after snapshot 0): a new segment, which later captures reuse.
                # Keeping the plain copies instead would make every capture of this
                # chain, and its push, hundreds of tensors for good.
                state = None
        if state is None:
            state = in_shared_memory({"model": self._state_dict(),
                                      "opt": self._optimizer_state()})
        state["version"] = self.version
        state["owned"] = True
        return state

    def _capture_soon(self, version: int, loop: asyncio.AbstractEventLoop,
                      done: asyncio.Future[None]) -> None:
        """Device thread, after an optimizer step: snapshot ``version`` in this device's
        next bubble (it waits for the neighbours' inputs in every step), off the step's
        critical path; ``done`` settles once it is taken. Parameters and optimizer state
        change only in the next optimizer step, which runs ``run_later`` first; layers
        with buffers (running statistics) may change them in a forward, so their stage
        is captured at once."""
        def capture() -> None:
            t0 = time.time()
            try:
                self._snapshots.put(version, self._capture(self._snapshots.spare()))
            except Exception as exc:  # reaches whoever reads the snapshot
                settle(loop, done, None, exc)
            else:
                settle(loop, done, None, None)
            self._later_spans.append([self.stages[-1], "snapshot", -1, t0, time.time()])

        if any(True for s in self.stages for _ in self.chunks[s].buffers()):
            capture()
        else:
            self.link.later(capture)

    async def _taken(self, version: int | None = None) -> None:
        """Wait until snapshot ``version`` is taken, and raise if taking it failed;
        without ``version``, until every deferred snapshot is settled (failed or not)."""
        if version is not None:
            captured = self._captures.get(version)
            if captured is not None:
                # shielded: a reader that gives up must not cancel it for the others
                await asyncio.shield(captured)
            return
        pending = list(self._captures.values())
        if pending:
            await asyncio.shield(asyncio.gather(*pending, return_exceptions=True))

    def _restore(self, state: State) -> None:
        self._load_state_dict(state["model"])
        opt = state["opt"]
        if self.optimizer is not None:
            # A fresh optimizer: state left from steps after the snapshot must not linger
            # (a parameter without state in the snapshot has none after the restore).
            self.optimizer.state.clear()
        # Cloned: the optimizer adopts tensors of the right dtype and device as they are,
        # and its in-place updates must not reach the snapshot, which may be needed again.
        self._load_optimizer_state({k: v.clone() for k, v in opt["tensors"].items()},
                                   opt["groups"])
        self.version = int(state["version"])

    async def take_snapshot(self, version: int) -> None:
        """Copy the current state to host memory as snapshot ``version``."""
        def take() -> None:
            self.link.run_later()
            self._snapshots.put(version, self._capture())
        await self._on_device(take)

    async def snapshot_state(self, version: int) -> State:
        """Local snapshot ``version`` (for a sibling replica that needs it too)."""
        await self._taken(version)
        return pack(self._snapshots.get(version))

    async def keep_snapshot(self, version: int, state: State) -> None:
        await self._taken()
        # not ours to overwrite
        self._snapshots.put(version, {**unpack(state), "owned": False})

    async def snapshots(self) -> list[int]:
        """Versions this stage keeps in its own memory."""
        await self._taken()
        return self._snapshots.versions()

    async def push_snapshot(self, holder: ActorRef, key: str, version: int) -> int:
        """Send local snapshot ``version`` to ``holder`` (on another node)."""
        await self._taken(version)
        state = pack(self._snapshots.get(version))
        result: int = await holder.put(key, version, state)
        return result

    async def restore(self, version: int) -> int:
        """Roll back to local snapshot ``version``."""
        await self._taken(version)
        state = self._snapshots.get(version)
        await self._on_device(functools.partial(self._restore, state))
        return self.version

    async def fetch(self, holder: ActorRef, key: str, version: int) -> int:
        """Restore snapshot ``version`` from ``holder`` (this stage's node is new), and
        keep it as a local version too."""
        state = unpack(await holder.get(key, version))
        await self._taken()
        await self._on_device(functools.partial(self._restore, state))
        self._snapshots.put(version, {**state, "owned": False})  # not ours to overwrite
        return self.version

    async def export_state(self) -> State:
        """The current state, for a new copy of this stage (a replica's sibling)."""
        return pack(await self._on_device(self._capture))

    async def import_state(self, state: State) -> int:
        """Take ``state`` (``export_state`` or ``snapshot_state`` of a sibling)."""
        await self._on_device(functools.partial(self._restore, unpack(state)))
        return self.version


def _filled(state: State, into: State) -> bool:
    """Whether every tensor of ``state`` is the one of ``into`` it was copied into (so
    all of them still lie in ``into``'s segment)."""
    pairs = [(state["model"], into["model"]),
             (state["opt"]["tensors"], into["opt"]["tensors"])]
    return all(len(new) == len(old) and all(t is old.get(k) for k, t in new.items())
               for new, old in pairs)


def _copy(value: torch.Tensor, into: torch.Tensor | None) -> torch.Tensor:
    """``value`` detached on the CPU, in ``into`` when it has the same shape and type."""
    value = value.detach()
    if into is not None and into.shape == value.shape and into.dtype == value.dtype:
        return into.copy_(value)
    return value.to("cpu", copy=True)



def settle(loop: asyncio.AbstractEventLoop, fut: asyncio.Future[Any], result: Any,
           error: BaseException | None) -> None:
    """From the device thread: resolve ``fut`` on its loop (ignored once the node is
    gone, or when the waiter gave up)."""
    def set_it() -> None:
        if fut.done():
            return
        if error is None:
            fut.set_result(result)
        else:
            fut.set_exception(error)

    with contextlib.suppress(RuntimeError):  # the node shut down under a running job
        loop.call_soon_threadsafe(set_it)

