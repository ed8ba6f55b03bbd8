"""``Pipeline``: the user's handle, and the scheduler actor that runs each step."""

from __future__ import annotations

import contextlib
import itertools
import secrets
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from typing import Any

import anyio
import torch
from torch import nn

from .. import Actor, ActorError, ActorRef, Node, RemoteNode, ShardlineError, to_thread
from . import _tree
from ._partition import _layers, balanced_bounds, layer_weights, split_bounds
from ._spec import LayerSpec
from ._stage import StageActor
from ._trace import Trace
from .schedules import Action, Schedule, by_name

__all__ = ["Pipeline", "PipelineError", "Scheduler"]

Placement = str | RemoteNode | tuple[RemoteNode, str]


class PipelineError(ShardlineError):
    """A stage failed (raised, or its node was lost) during a step. ``stage`` is the
    device index of the first stage that failed; the original error is ``__cause__``."""

    def __init__(self, message: str, stage: int) -> None:
        super().__init__(message)
        self.stage = stage


class Scheduler(Actor):
    """Runs steps: hands every device its part of the schedule, waits for all of them,
    and turns the first failure into a ``PipelineError`` (cancelling the rest)."""

    max_concurrency = 64  # concurrent inference calls overlap in the pipeline

    def __init__(self, devices: list[ActorRef], schedule: Schedule,
                 trace: bool = False) -> None:
        self.devices = devices
        self.schedule = schedule
        self._steps = itertools.count()
        self._programs = [_program(acts) for acts in schedule.actions]
        self.tracing = trace
        # Recorded steps, oldest dropped first: a long run with tracing on stays bounded.
        self._records: deque[dict[str, Any]] = deque(maxlen=10_000)

    def set_tracing(self, on: bool) -> None:
        self.tracing = on

    def take_trace(self) -> list[dict[str, Any]]:
        """The steps recorded since the last call (and forget them)."""
        records = list(self._records)
        self._records.clear()
        return records

    async def train_step(self, x: Any, y: Any) -> float:
        m = self.schedule.n_microbatches
        xs, ys = _tree.split(x, m), _tree.split(y, m)
        results = await self._run(self._programs, dict(enumerate(xs)), dict(enumerate(ys)),
                                  True, m)
        losses: dict[int, float] = {}
        for r in results:
            losses.update(r.get("losses", {}))
        return sum(losses.values()) / m

    async def infer(self, x: Any, cache: str | None = None) -> Any:
        first = _tree.leaves(x)
        m = max(1, min(self.schedule.n_microbatches, first[0].shape[0] if first else 1))
        if cache is not None:
            m = 1  # a cached request's state belongs to its whole batch
        xs = _tree.split(x, m)
        programs = [_program([a for a in acts if a.kind == "F" and a.mb < m])
                    for acts in self.schedule.actions]
        results = await self._run(programs, dict(enumerate(xs)), None, False, m, cache)
        outputs: dict[int, Any] = {}
        for r in results:
            outputs.update(r.get("outputs", {}))
        return _tree.cat([outputs[i] for i in range(m)])

    async def release(self, cache: str) -> None:
        for ref in self.devices:
            await ref.tell("release", cache)

    async def _run(self, programs: list[list[list[Any]]], inputs: dict[int, Any],
                   targets: dict[int, Any] | None, train: bool, m: int,
                   cache: str | None = None) -> list[dict[str, Any]]:
        step = next(self._steps)
        trace = self.tracing
        started = time.time()
        first_device = self.schedule.device_of(0)
        last_device = self.schedule.device_of(self.schedule.n_stages - 1)
        results: list[dict[str, Any]] = [{} for _ in self.devices]
        failure: list[tuple[int, BaseException]] = []

        async def one(d: int, ref: ActorRef) -> None:
            try:
                results[d] = await ref.run(
                    step, programs[d], inputs if d == first_device else None,
                    targets if d == last_device else None, train, m, trace, cache)
            except Exception as exc:
                if not failure:
                    failure.append((d, exc))
                tg.cancel_scope.cancel()

        async with anyio.create_task_group() as tg:
            for d, ref in enumerate(self.devices):
                tg.start_soon(one, d, ref)
        if failure:
            d, exc = failure[0]
            raise PipelineError(f"stage {d} failed: {type(exc).__name__}: {exc}", d) from exc
        if trace:
            self._records.append({"step": step, "what": "train" if train else "infer",
                                  "start": started, "end": time.time(),
                                  "devices": [r.pop("spans", []) for r in results]})
        return results


def _program(actions: Sequence[Action]) -> list[list[Any]]:
    """Actions as the stage actor reads them: ``[stage, kind, microbatch]``."""
    return [[a.stage, a.kind, a.mb] for a in actions]


class Pipeline:
    """A model split over stage actors. Build it with ``await Pipeline.start(...)``."""

    def __init__(self, node: Node, scheduler: ActorRef, devices: list[ActorRef],
                 schedule: Schedule, trace: bool = False) -> None:
        self.node = node
        self.scheduler = scheduler
        self.devices = devices
        self.schedule = schedule
        self._always_trace = trace
        self._held: list[dict[str, Any]] = []  # recorded steps timeline() has not returned
        self.model_spec: LayerSpec | None = None  # what a checkpoint records

    @classmethod
    async def start(cls, node: Node, model: nn.Module | LayerSpec, *,
                    stages: int | None = None, split_points: Sequence[int] | None = None,
                    placement: Sequence[Placement] | None = None, schedule: str = "1f1b",
                    microbatches: int = 8, chunks: int = 2,
                    loss_fn: str | Callable[..., torch.Tensor] | None = None,
                    optimizer: tuple[str, dict[str, Any]] | None = None,
                    balance: str = "params", trace: bool = False,
                    cache_idle_s: float = 300.0) -> Pipeline:
        """Split ``model`` into stages, spawn a ``StageActor`` per device, connect them.

        ``stages`` counts devices; with ``schedule="interleaved-1f1b"`` each device holds
        ``chunks`` stages. ``placement`` has one entry per device: ``"cpu"``/``"cuda:0"``
        (this process), a ``RemoteNode``, or ``(RemoteNode, "cuda:1")``. A plain
        ``nn.Module`` can only be placed in this process; use a ``LayerSpec`` for remote
        stages. ``trace=True`` records every step (``await pipe.timeline()``).
        ``cache_idle_s``: how long a stage keeps a ``generate`` request's state after
        its last use when nobody released it.
        """
        if split_points is not None:
            n_devices = len(split_points) + 1
        elif stages is not None:
            n_devices = stages
        elif placement is not None:
            n_devices = len(placement)
        else:
            raise ValueError("give stages=N, split_points=[...] or a placement list")
        if placement is None:
            placement = ["cpu"] * n_devices
        if len(placement) != n_devices:
            raise ValueError(f"placement has {len(placement)} entries for {n_devices} devices")
        v = chunks if schedule.lower().startswith("interleaved") else 1
        if split_points is not None and v > 1:
            raise ValueError("split_points gives one stage per device; interleaved schedules "
                             "need stages=N")
        plan = by_name(schedule, n_devices, microbatches, v)
        n_stages = plan.n_stages

        if isinstance(model, LayerSpec):
            n_layers = model.n_layers
            layers: list[nn.Module] | None = None
            names = [str(i) for i in range(n_layers)]
            weights = [1.0] * n_layers
        else:
            layers = _layers(model)
            n_layers = len(layers)
            names = _layer_names(model)
            weights = layer_weights(layers, balance)
        if split_points is not None:
            bounds = split_bounds(n_layers, split_points)
        else:
            bounds = balanced_bounds(weights, n_stages)

        if layers is not None and any(not isinstance(p, str) for p in placement):
            raise ValueError("an nn.Module can only be placed on this process's devices; "
                             "describe it with a LayerSpec to place stages on other nodes")
        remote = any(not isinstance(p, str) for p in placement)
        if remote and any(isinstance(p, str) for p in placement) and not node.address.startswith(
                "tcp://"):
            raise ValueError("mixing local and remote stages needs this node to listen "
                             "(Node(listen='tcp://...')) so remote stages can reach local ones")

        slots: list[ActorRef | None] = [None] * n_devices
        # Stamped on every activation, so a device link only takes this pipeline's data.
        token = secrets.token_hex(8)
        errors: list[BaseException] = []

        async def spawn_device(d: int, where: Placement) -> None:
            held = [s for s in range(n_stages) if plan.device_of(s) == d]
            last_here = (n_stages - 1) in held
            kwargs: dict[str, Any] = {
                "device_index": d, "stages": held, "n_stages": n_stages,
                "bounds": [list(bounds[s]) for s in held],
                "layer_names": [names[bounds[s][0]:bounds[s][1]] for s in held],
                "optimizer": list(optimizer) if optimizer is not None else None,
                "loss_fn": loss_fn if last_here else None,
                "token": token,
                "cache_idle_s": cache_idle_s,
            }
            try:
                if isinstance(where, str):
                    if layers is not None:
                        kwargs["modules"] = [nn.Sequential(*layers[bounds[s][0]:bounds[s][1]])
                                             for s in held]
                    else:  # built here: this process chose the spec, nothing to allow
                        assert isinstance(model, LayerSpec)
                        kwargs["modules"] = [
                            await to_thread(model.build, bounds[s][0], bounds[s][1])
                            for s in held]
                    slots[d] = await node.spawn(StageActor, device=where, **kwargs)
                else:
                    remote_node, dev = (where, "cpu") if isinstance(where, RemoteNode) else where
                    if last_here and loss_fn is not None and not isinstance(loss_fn, str):
                        raise ValueError("a remote last stage needs loss_fn as an import "
                                         "path, e.g. 'torch.nn.functional:cross_entropy'")
                    assert isinstance(model, LayerSpec)
                    kwargs["spec"] = model.to_wire()
                    slots[d] = await remote_node.spawn(
                        "shardline.models._stage:StageActor", device=dev, **kwargs)
            except Exception as exc:
                errors.append(exc)

        devices: list[ActorRef] = []
        try:
            # In parallel: a first stage on a fresh worker spends seconds importing torch.
            async with anyio.create_task_group() as tg:
                for d, where in enumerate(placement):
                    tg.start_soon(spawn_device, d, where)
            devices = [ref for ref in slots if ref is not None]
            if errors:
                raise errors[0]
            addresses = [await ref.link_address() for ref in devices]
            links = [addresses[plan.device_of(s)] for s in range(n_stages)]
            for ref in devices:
                await ref.connect(links)
            scheduler = await node.spawn(Scheduler, devices, plan, trace)
        except BaseException:
            with anyio.CancelScope(shield=True):
                for ref in devices:
                    await _quietly(ref.stop())
            raise
        pipe = cls(node, scheduler, devices, plan, trace)
        pipe.model_spec = model if isinstance(model, LayerSpec) else None
        return pipe

    async def train_step(self, x: Any, y: Any) -> float:
        """One optimizer step over the batch ``(x, y)`` split into microbatches; returns
        the mean of the microbatch losses. A failed stage raises ``PipelineError``."""
        return float(await self._schedule("train_step", x, y))

    async def __call__(self, x: Any) -> Any:
        """Inference (no autograd state kept); concurrent calls overlap in the pipeline."""
        return await self._schedule("infer", x)

    async def generate(self, prompt: Sequence[int] | torch.Tensor, max_new_tokens: int, *,
                       temperature: float = 0.0, top_p: float = 1.0,
                       seed: int | None = None,
                       eos_token_id: int | Sequence[int] | None = None,
                       ) -> AsyncGenerator[int, None]:
        """Tokens of a continuation of ``prompt`` (token ids), one at a time, for a
        causal LM whose last layer returns logits ``[batch, time, vocab]``.

        The prompt goes through the pipeline once; after that only the newest token
        does: every stage keeps its layers' keys and values for this request
        (``forward_cached``) until the iteration ends, is closed or cancelled.
        ``temperature == 0`` is greedy; otherwise sampling with nucleus ``top_p`` and a
        generator seeded with ``seed``. Generation stops after yielding
        ``eos_token_id`` (one id or several; ``None``: the ``eos_token_id`` of the
        ``LayerSpec`` the pipeline was started from, if its config has one; ``[]``: never).
        """
        from ._generate import sample

        if eos_token_id is None and self.model_spec is not None:
            eos_token_id = self.model_spec.config.get("eos_token_id")
        stop = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())

        ids = torch.as_tensor(prompt, dtype=torch.int64).reshape(1, -1)
        if ids.shape[1] == 0:
            raise ValueError("the prompt is empty")
        gen = torch.Generator()
        gen.manual_seed(seed if seed is not None else secrets.randbits(63))
        cache = secrets.token_hex(8)
        try:
            x = ids
            for _ in range(max_new_tokens):
                logits = await self._schedule("infer", x, cache)
                token = sample(logits[0, -1], temperature, top_p, gen)
                yield token
                if token in stop:
                    break
                x = torch.tensor([[token]], dtype=torch.int64)
        finally:
            with anyio.CancelScope(shield=True):
                await _quietly(self.scheduler.release(cache))

    async def timeline(self) -> Trace:
        """The steps recorded since the last call: every step with ``trace=True``, or
        those inside a ``pipe.trace()`` block."""
        held, self._held = self._held, []
        return Trace.from_wire(held + await self.scheduler.take_trace())

    @contextlib.asynccontextmanager
    async def trace(self) -> AsyncIterator[Trace]:
        """Record the steps run inside the block::

            async with pipe.trace() as trace:
                await pipe.train_step(x, y)
            trace.to_chrome("step.json")
        """
        # The block gets only its own steps; with trace=True, earlier ones stay for
        # timeline().
        earlier = await self.scheduler.take_trace()
        if self._always_trace:
            self._held.extend(earlier)
        await self.scheduler.set_tracing(True)
        recorded = Trace()
        try:
            yield recorded
        finally:
            with anyio.CancelScope(shield=True):
                if not self._always_trace:
                    await _quietly(self.scheduler.set_tracing(False))
                with contextlib.suppress(ShardlineError):
                    recorded.steps.extend(Trace.from_wire(
                        await self.scheduler.take_trace()).steps)

    async def _schedule(self, method: str, *args: Any) -> Any:
        try:
            return await self.scheduler.ask(method, *args)
        except ActorError as exc:
            # The scheduler lives here; its PipelineError is the error to show.
            if isinstance(exc.__cause__, PipelineError):
                raise exc.__cause__ from exc.__cause__.__cause__
            raise

    async def state_dict(self) -> dict[str, torch.Tensor]:
        """The unsharded model's ``state_dict()``, gathered from every stage."""
        out: dict[str, torch.Tensor] = {}
        for ref in self.devices:
            out.update(await ref.state_dict())
        return out

    async def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for ref in self.devices:
            await ref.load_state_dict(state)

    async def save(self, directory: str) -> None:
        """Model and optimizer state to ``directory`` (safetensors, atomic per file)."""
        from ._checkpoint import save_checkpoint

        await save_checkpoint(self, directory)

    async def load(self, directory: str) -> None:
        from ._checkpoint import load_checkpoint

        await load_checkpoint(self, directory)

    async def stop(self) -> None:
        """Stop the scheduler and every stage actor."""
        await _quietly(self.scheduler.stop())
        for ref in self.devices:
            await _quietly(ref.stop())


async def _quietly(awaitable: Any) -> None:
    with contextlib.suppress(ShardlineError):  # already gone: nothing left to stop
        await awaitable


def _layer_names(model: nn.Module) -> list[str]:
    if isinstance(model, (nn.Sequential, nn.ModuleList)):
        return [str(i) for i in range(len(model))]
    return [name for name, _ in model.named_children()]
