"""``Pipeline``: the user's handle on a model split over stage actors.

``start`` turns its arguments into a ``Plan`` (pure data: which layers each device of
each replica holds, where, and who keeps its snapshot), then executes it: a ``Fleet``
spawns and links the stage actors, and a ``Scheduler`` actor runs the steps.
"""

from __future__ import annotations

import contextlib
import functools
import secrets
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import anyio
import torch
from torch import nn

from .. import ActorError, ActorRef, Node, RemoteNode, ShardlineError
from .._wire_dtype import check_wire_dtype
from . import _tree
from ._errors import PipelineError
from ._fleet import Fleet, Replacements, StageOptions
from ._partition import _layers, balanced_bounds, layer_weights, split_bounds
from ._plan import LOCAL, Place, Plan, build_plan
from ._scheduler import Scheduler
from ._spec import LayerSpec
from ._trace import Trace
from .schedules import Schedule, by_name

__all__ = ["Pipeline", "PipelineError", "Scheduler"]

Placement = str | RemoteNode | tuple[RemoteNode, str]


class Pipeline:
    """A model split over stage actors. Build it with ``await Pipeline.start(...)``."""

    def __init__(self, node: Node, scheduler: ActorRef, fleet: Fleet,
                 trace: bool = False) -> None:
        self.node = node
        self.scheduler = scheduler
        self.fleet = fleet
        self._always_trace = trace
        self._held: list[dict[str, Any]] = []  # recorded steps timeline() has not returned
        self.model_spec: LayerSpec | None = None  # what a checkpoint records

    @property
    def plan(self) -> Plan:
        """Where every stage runs now (it changes when a lost node is replaced)."""
        return self.fleet.plan

    @property
    def schedule(self) -> Schedule:
        return self.fleet.plan.schedule

    @property
    def replicas(self) -> int:
        return self.fleet.plan.replicas

    @property
    def devices(self) -> list[ActorRef]:
        """The stage actors of replica 0, one per device."""
        return self.fleet.replica(0)

    def replica_devices(self, replica: int) -> list[ActorRef]:
        return self.fleet.replica(replica)

    @classmethod
    async def start(cls, node: Node, model: nn.Module | LayerSpec, *,
                    stages: int | None = None, split_points: Sequence[int] | None = None,
                    placement: Sequence[Placement] | Sequence[Sequence[Placement]] | None
                    = None, schedule: str = "1f1b",
                    microbatches: int = 8, chunks: int = 2,
                    loss_fn: str | Callable[..., torch.Tensor] | None = None,
                    optimizer: tuple[str, dict[str, Any]] | None = None,
                    balance: str = "params", trace: bool = False,
                    cache_idle_s: float = 300.0, replicas: int = 1,
                    spares: Sequence[RemoteNode] | Replacements = (),
                    snapshot_every: int | None = None,
                    check_finite: bool = False, wire_dtype: str | None = None) -> Pipeline:
        """Split ``model`` into stages, spawn a ``StageActor`` per device, connect them.

        ``stages`` counts devices (the layers split to balance the stages: an
        ``nn.Module``'s by parameters, or layers with ``balance="layers"``, a
        ``LayerSpec``'s by its ``costs``); with ``schedule="interleaved-1f1b"`` each device holds
        ``chunks`` stages. ``placement`` has one entry per device: ``"cpu"``/``"cuda:0"``
        (this process), a ``RemoteNode``, or ``(RemoteNode, "cuda:1")``; with
        ``replicas=R`` it is R such lists, one per copy of the pipeline (the batch is
        split across them and their gradients averaged). A plain ``nn.Module`` can only
        be placed in this process; use a ``LayerSpec`` for remote stages.
        ``trace=True`` records every step (``await pipe.timeline()``). ``cache_idle_s``:
        how long a stage keeps a ``generate`` request's state after its last use when
        nobody released it.

        Self-healing: ``spares`` are nodes held in reserve, or an object that hands back
        a replacement for a lost node (``LocalCluster(restart=True)``: its restarted
        worker); when a stage's node is lost during ``train_step``, its stages move to a
        spare, their state is restored
        (from a surviving replica, or from the in-memory snapshot taken every
        ``snapshot_every`` steps and kept on another node; default 1 when there are
        spares and an optimizer, else off) and the step runs again. A pipeline that has
        not trained or loaded anything rebuilds a lost stage from its ``LayerSpec``; its
        inference calls run again, and ``generate`` streams replay their tokens into the
        new stage and continue. With replicas and no spare, inference moves to a
        replica that is whole. ``check_finite=True`` fails a step
        (``PipelineError`` naming the stage and microbatch) before any weight changes
        when an activation, loss or gradient is NaN or infinite.
        ``wire_dtype`` (``"bf16"``, ``"fp16"`` or ``"int8"``, blockwise absmax) compresses
        the floating activations and gradients that cross processes; they arrive in their
        own dtype. Off by default; never applied within a process or to integer tensors.
        """
        check_wire_dtype(wire_dtype)
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        rows = _placement_rows(placement, replicas)
        if split_points is not None:
            n_devices = len(split_points) + 1
        elif stages is not None:
            n_devices = stages
        elif rows is not None:
            n_devices = len(rows[0])
        else:
            raise ValueError("give stages=N, split_points=[...] or a placement list")
        if rows is None:
            rows = [["cpu"] * n_devices for _ in range(replicas)]
        for r, row in enumerate(rows):
            if len(row) != n_devices:
                raise ValueError(f"placement{f' of replica {r}' if replicas > 1 else ''} "
                                 f"has {len(row)} entries for {n_devices} devices")
        v = chunks if schedule.lower().startswith("interleaved") else 1
        plan_schedule = by_name(schedule, n_devices, microbatches, v)
        if split_points is not None and plan_schedule.chunks > 1:
            raise ValueError(f"split_points gives one stage per device; {schedule} places "
                             f"{plan_schedule.chunks} stages on each device: give stages=N")
        if isinstance(model, LayerSpec):
            n_layers = model.n_layers
            layers: list[nn.Module] | None = None
            names = [str(i) for i in range(n_layers)]
            weights = list(model.costs) if model.costs is not None else [1.0] * n_layers
        else:
            layers = _layers(model)
            n_layers = len(layers)
            names = _layer_names(model)
            weights = layer_weights(layers, balance)
        if split_points is not None:
            bounds = split_bounds(n_layers, split_points)
        else:
            bounds = balanced_bounds(weights, plan_schedule.n_stages)

        nodes: dict[str, RemoteNode] = {}
        places = [[_place(p, nodes) for p in row] for row in rows]
        replacements: Replacements | None = None
        if hasattr(spares, "replacement"):
            replacements = spares
            spares = ()
        spare_places = [_place(p, nodes) for p in spares]
        remote = any(p.node != LOCAL for row in places for p in row)
        if layers is not None and (remote or spare_places):
            raise ValueError("an nn.Module can only be placed on this process's devices; "
                             "describe it with a LayerSpec to place stages on other nodes")
        if remote and any(p.node == LOCAL for row in places for p in row) and \
                not node.address.startswith("tcp://"):
            raise ValueError("mixing local and remote stages needs this node to listen "
                             "(Node(listen='tcp://...')) so remote stages can reach local ones")
        if snapshot_every is None:
            # Inference-only pipelines rebuild a lost stage from the spec instead.
            snapshot_every = 1 if (spare_places or replacements) and optimizer is not None \
                else 0
        if snapshot_every < 0:
            raise ValueError(f"snapshot_every must be >= 0, got {snapshot_every}")
        plan = build_plan(plan_schedule, bounds, names, places, spare_places)
        options = StageOptions(optimizer, loss_fn, secrets.token_hex(8), cache_idle_s,
                               check_finite, wire_dtype)
        # Stamped on every activation (the token), so a device link only takes this
        # pipeline's data.
        source: LayerSpec | list[nn.Module]
        if layers is not None:
            source = layers
        else:
            assert isinstance(model, LayerSpec)
            source = model
        fleet = Fleet(node, plan, source, options, nodes, replacements)
        await fleet.start(snapshots=snapshot_every > 0)
        try:
            scheduler = await node.spawn(Scheduler, fleet, trace, snapshot_every)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await fleet.stop()
            raise
        pipe = cls(node, scheduler, fleet, trace)
        pipe.model_spec = model if isinstance(model, LayerSpec) else None
        return pipe

    async def train_step(self, x: Any, y: Any) -> float:
        """One optimizer step over the batch ``(x, y)`` split into microbatches (and
        across replicas); returns the mean of the microbatch losses. Steps run one at a
        time, in call order. A failed stage raises ``PipelineError``, with every weight
        as it was before the step, unless the pipeline recovered (``spares``).
        ``ValueError`` at once, before anything runs, when the pipeline has no loss or
        the batch is too small to split."""
        self._check_batch(x, y)
        if self.fleet.can_replace() or self.fleet.plan.replicas > 1:
            # kept for a replay after a recovery: the caller may reuse its tensors
            x, y = _tree.map_tensors(x, torch.clone), _tree.map_tensors(y, torch.clone)
        return float(await self._schedule("train_step", x, y))

    def _check_batch(self, x: Any, y: Any) -> None:
        if self.fleet.options.loss_fn is None:
            raise ValueError("train_step needs a loss: start the pipeline with loss_fn=..., "
                             "e.g. 'torch.nn.functional:cross_entropy'")
        replicas, m = self.replicas, self.schedule.n_microbatches
        for name, value in (("x", x), ("y", y)):
            leaves = _tree.leaves(value)
            if not leaves:
                raise ValueError(f"{name} holds no tensor to split into microbatches")
            rows = leaves[0].shape[0] if leaves[0].dim() else 0
            if rows < replicas * m:
                per = f"{replicas} replicas x {m}" if replicas > 1 else f"{m}"
                raise ValueError(f"a batch of {rows} rows cannot be split into {per} "
                                 f"microbatches; pass at least {replicas * m} rows or start "
                                 "the pipeline with fewer microbatches")

    async def __call__(self, x: Any) -> Any:
        """Inference (no autograd state kept); concurrent calls overlap in the pipeline."""
        return await self._schedule("infer", x)

    async def stats(self) -> dict[str, Any]:
        """Steps done, the stable snapshot version, every recovery (what was lost, where
        its stages went, how long it took), the count of non-finite losses, and the
        batched ``generate`` calls (``"prefill"``, ``"decode"``: calls, rows,
        max_rows, and ahead_rows: rows of decode steps that went out before the step
        they go on from was back, their token handed from the last stage to the
        first)."""
        result: dict[str, Any] = await self.scheduler.stats()
        return result

    async def generate(self, prompt: Sequence[int] | torch.Tensor, max_new_tokens: int, *,
                       temperature: float = 0.0, top_p: float = 1.0,
                       seed: int | None = None,
                       eos_token_id: int | Sequence[int] | None = None,
                       ) -> AsyncGenerator[int, None]:
        """Tokens of a continuation of ``prompt`` (token ids), one at a time, for a
        causal LM whose last layer returns logits ``[batch, time, vocab]``.

        The prompt goes through the pipeline once; after that only the newest token
        does: every stage keeps its layers' keys and values for this request until the
        iteration ends, is closed or cancelled. Concurrent calls are batched token by
        token (continuous batching, ``forward_cached_batch``): each decode step runs
        the newest token of every request waiting for one as one batch through the
        stages; requests join and leave between steps, each with its own state on every
        stage, and get the tokens they would get alone. New prompts go through in
        prefill calls of their own, between decode steps, several prompts per call
        and at most ``Scheduler.prefill_chunk`` tokens of each, so a long prompt holds
        up the running requests for one chunk at a time.
        ``temperature == 0`` is greedy; otherwise sampling with nucleus ``top_p`` and a
        generator of this request's own, seeded with ``seed``. Generation stops after
        yielding ``eos_token_id`` (one id or several; ``None``: the ``eos_token_id`` of
        the ``LayerSpec`` the pipeline was started from, if its config has one; ``[]``:
        never).
        """
        from ._generate import sample

        if eos_token_id is None and self.model_spec is not None:
            eos_token_id = self.model_spec.config.get("eos_token_id")
        stop = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")

        ids = torch.as_tensor(prompt, dtype=torch.int64).reshape(-1).tolist()
        if not ids:
            raise ValueError("the prompt is empty")
        gen = torch.Generator()
        gen.manual_seed(seed if seed is not None else secrets.randbits(63))
        cache = secrets.token_hex(8)
        tokens: list[int] = []

        # Greedy: the last stage sends the argmax, not a vocabulary-wide row of logits.
        async def prefill(x: list[int]) -> torch.Tensor | int:
            out: torch.Tensor | int = await self._schedule("prefill", cache, x,
                                                           temperature == 0)
            return out

        async def decode(token: int, more: bool) -> torch.Tensor | int:
            out: torch.Tensor | int = await self._schedule("decode", cache, token,
                                                           temperature == 0, more)
            return out

        async def forward(first: Callable[[], Awaitable[torch.Tensor | int]]
                          ) -> torch.Tensor | int:
            nonlocal cache
            try:
                return await first()
            except PipelineError as exc:
                if not exc.recovered:
                    raise
                failure = exc
            for _ in range(3):
                # A stage holding this request's state was lost and the pipeline
                # replaced it: replay the request into fresh caches (Petals' replay),
                # the prompt and every token so far as one prefill. The caches equal the
                # lost ones up to float rounding (as do those of a decode step's rows,
                # whatever else shares the step).
                with anyio.CancelScope(shield=True):
                    await _quietly(self.scheduler.release(cache))
                cache = secrets.token_hex(8)
                try:
                    return await prefill(ids + tokens)
                except PipelineError as exc:
                    if not exc.recovered:
                        raise
                    failure = exc
            raise failure

        try:
            logits = await forward(lambda: prefill(ids))
            for i in range(max_new_tokens):
                token = logits if isinstance(logits, int) else \
                    sample(logits, temperature, top_p, gen)
                tokens.append(token)
                yield token
                if token in stop or i + 1 == max_new_tokens:
                    break
                # Whether it asks for the token after the next one: the step for it
                # may run ahead meanwhile.
                logits = await forward(functools.partial(decode, token,
                                                         i + 2 < max_new_tokens))
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

    async def state_dict(self, replica: int = 0) -> dict[str, torch.Tensor]:
        """The unsharded model's ``state_dict()``, gathered from every stage of
        ``replica`` (all replicas are equal after every step)."""
        if not 0 <= replica < self.replicas:
            raise ValueError(f"replica must be in [0, {self.replicas}), got {replica}")
        out: dict[str, torch.Tensor] = {}
        for ref in self.fleet.replica(replica):
            out.update(await ref.state_dict())
        return out

    async def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load the unsharded model's ``state_dict()`` into every replica."""
        for ref in self.fleet.all_refs():
            await ref.load_state_dict(state)
        await self.scheduler.resnapshot()

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
        await self.fleet.stop()


async def _quietly(awaitable: Any) -> None:
    with contextlib.suppress(ShardlineError):  # already gone: nothing left to stop
        await awaitable


def _placement_rows(placement: Any, replicas: int) -> list[list[Placement]] | None:
    """The placement as one list per replica."""
    if placement is None:
        return None
    entries = list(placement)
    nested = bool(entries) and all(isinstance(e, (list, tuple)) and not (
        len(e) == 2 and isinstance(e[0], RemoteNode) and isinstance(e[1], str))
        for e in entries)
    if replicas == 1 and not nested:
        return [entries]
    if not nested or len(entries) != replicas:
        raise ValueError(f"with replicas={replicas}, placement must be {replicas} lists, "
                         "one per replica, e.g. [[a, b], [c, d]]")
    return [list(row) for row in entries]


def _place(where: Placement, nodes: dict[str, RemoteNode]) -> Place:
    if isinstance(where, str):
        return Place(LOCAL, where)
    remote, device = (where, "cpu") if isinstance(where, RemoteNode) else where
    if not isinstance(remote, RemoteNode) or not isinstance(device, str):
        raise TypeError(f"a place is 'cpu'/'cuda:N', a RemoteNode or (RemoteNode, "
                        f"'cuda:N'), got {where!r}")
    nodes[remote.address] = remote
    return Place(remote.address, device)


def _layer_names(model: nn.Module) -> list[str]:
    if isinstance(model, (nn.Sequential, nn.ModuleList)):
        return [str(i) for i in range(len(model))]
    return [name for name, _ in model.named_children()]
