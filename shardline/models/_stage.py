"""``StageActor``: one device's shard(s) of a pipelined model.

It runs the action list the scheduler sends for a step on its device thread, which
takes activations and gradients straight from its neighbours' device threads and sends
its own outputs straight on (``_device``): the scheduler never relays tensors, and the
node's event loop stays free for heartbeats and control messages meanwhile.

A training step is two phases. ``run`` does the forwards and backwards and leaves the
gradients in place; ``commit`` applies the optimizer, once every device's ``run``
succeeded. So a step that fails anywhere (a lost node, a non-finite value, a bug)
changes no weights anywhere, and can be run again.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .. import Actor, to_thread
from ..transport import parse_tcp
from . import _tree
from ._allreduce import GradSync, join_group
from ._autograd import (
    SplitBackward,
    backward_full,
    backward_input,
    backward_weight,
    check_finite,
)
from ._device import Device, Key
from ._kvbatch import last_positions
from ._rows import pick_tokens, run_rows
from ._snapshot import Versions
from ._spec import LayerSpec, import_path
from ._stage_state import StageState, settle

__all__ = ["StageActor"]

class StageActor(StageState, Actor):
    """One device of a pipeline: the layers of its stages (several with interleaved or
    V-shaped schedules), its optimizer, and a device thread that runs the actions the
    scheduler sends for each step and talks to the neighbouring devices directly.

    Spawned by ``Pipeline.start`` (one per device of every replica); not meant to be
    called directly except through the pipeline. Its state methods (``state_dict``,
    snapshots) come from ``StageState``.
    """

    # Steps and inference calls overlap: run() only waits for its program, which the
    # device thread executes; many can be in flight.
    max_concurrency = 256

    def __init__(self, device_index: int, stages: list[int], n_stages: int,
                 bounds: list[list[int]], layer_names: list[list[str]] | None = None,
                 modules: list[nn.Module] | None = None, spec: dict[str, Any] | None = None,
                 device: str = "cpu", optimizer: Sequence[Any] | None = None,
                 loss_fn: Any = None, token: str = "", cache_idle_s: float = 300.0,
                 check_finite: bool = False, replica: int = 0,
                 wire_dtype: str | None = None) -> None:
        self.device_index = device_index
        self._wire_dtype = wire_dtype
        self.replica = replica
        self.stages = list(stages)                 # virtual stages held, ascending
        self.n_stages = n_stages
        self.device = torch.device(device)
        self._modules = modules
        self._spec = spec
        self._bounds = bounds
        self._layer_names = layer_names
        self._optimizer_spec = optimizer
        self._loss_spec = loss_fn
        self._token = token
        self.check_finite = check_finite
        self.chunks: dict[int, nn.Module] = {}
        self.names: dict[int, list[str]] = {}
        self.optimizer: torch.optim.Optimizer | None = None
        self.loss_fn: Callable[..., torch.Tensor] | None = None
        self.links: list[str] = []                 # link address of every virtual stage
        self._device: Device | None = None
        self.busy_seconds = 0.0                    # compute time, for metrics
        self.operations = 0
        self.cache_idle_s = cache_idle_s
        self._caches: dict[str, _Cache] = {}       # device thread only
        self._expired: dict[str, None] = {}        # recently expired ids, oldest first
        self._released: dict[str, None] = {}       # recently released ids, oldest first
        self._snapshots = Versions(keep=2)
        self._captures: dict[int, asyncio.Future[None]] = {}  # version -> taken
        self._later_spans: list[list[Any]] = []    # of deferred snapshots (device thread)
        self.version = 0                           # training steps committed here
        self._sync: GradSync | None = None         # gradient averaging over replicas
        self._training: _Program | None = None     # the newest training step (device thread)
        self.replicas = 1

    async def on_start(self) -> None:
        self._device = Device(f"stage{self.device_index}", self._token,
                              self.node._endpoint, self.node.peer_timeout,
                              idle=self._expire_caches, wire_dtype=self._wire_dtype)
        # Building (and loading) a shard can take long: off the loop, so the node keeps
        # answering heartbeats.
        await to_thread(self._build)

    async def on_stop(self) -> None:
        if self._sync is not None:
            self._sync.close()
        if self._device is not None:
            await to_thread(self._device.close)

    def _build(self) -> None:
        # Import paths (optimizer, loss) always go through this node's allow-list: the
        # constructor arguments may have come from a peer.
        modules, bounds, allow = self._modules, self._bounds, self.node.allow
        if modules is None:
            if self._spec is None:
                raise ValueError("a stage needs either modules or a LayerSpec")
            layer_spec = LayerSpec.from_wire(self._spec)
            modules = [layer_spec.build(a, b, allow) for a, b in bounds]
        self._modules = None  # the chunks own them now
        self.chunks = {s: m.to(self.device)
                       for s, m in zip(self.stages, modules, strict=True)}
        names = self._layer_names or [[str(i) for i in range(a, b)] for a, b in bounds]
        self.names = dict(zip(self.stages, names, strict=True))
        if self._optimizer_spec is not None:
            path, kwargs = self._optimizer_spec
            opt_cls = import_path(str(path), allow)
            params = self._parameters()
            # A stage of parameter-free layers (an activation, a pooling) has nothing
            # to optimize; torch's optimizers refuse an empty list.
            if params:
                self.optimizer = opt_cls(params, **dict(kwargs or {}))
        loss = self._loss_spec
        self.loss_fn = import_path(loss, allow) if isinstance(loss, str) else loss
        if self.optimizer is None:  # inference: an LM head readies its greedy picks
            for chunk in self.chunks.values():
                for layer in chunk.children():
                    prepare = getattr(layer, "prepare_pick", None)
                    if prepare is not None:
                        prepare()

    def _parameters(self, stage: int | None = None) -> list[nn.Parameter]:
        stages = self.stages if stage is None else [stage]
        return [p for s in stages for p in self.chunks[s].parameters()]

    def link_address(self) -> str:
        """Where other devices send this one's inputs (activations and gradients)."""
        return self.link.address

    def stats(self) -> dict[str, float]:
        """Compute seconds and forward/backward operations run so far on this device."""
        return {"busy_seconds": self.busy_seconds, "operations": self.operations}

    def connect(self, links: list[str]) -> None:
        """The link address of the device holding each virtual stage (index = stage)."""
        self.links = list(links)

    async def join_replicas(self, host: str, port: int, prefix: str, size: int,
                            timeout: float = 60.0) -> None:
        """Join the process group of this device's copies in every replica, as rank
        ``replica`` (rendezvous at the driver's store ``host:port``; every member must
        call it at once). Its gradients are averaged over the group before each
        optimizer step."""
        bind = "127.0.0.1"
        if self.node.address.startswith("tcp://"):
            bind, _ = parse_tcp(self.node.address)
        group = await to_thread(join_group, host, port, prefix, self.replica, size,
                                str(self.device), bind, timeout)

        def install() -> None:
            if self._sync is not None:
                self._sync.close()
            self._sync = GradSync({s: self._parameters(s) for s in self.stages}, group,
                                  size, timeout)
            self.replicas = size

        await self._on_device(install)

    def alive(self) -> int:
        """Answers while the stage's node does; the training steps committed here."""
        return self.version


    async def run(self, step: int, actions: list[list[Any]],
                  inputs: dict[int, Any] | None = None,
                  targets: dict[int, Any] | None = None, train: bool = True,
                  n_microbatches: int = 1, trace: bool = False,
                  cache: str | list[str] | None = None,
                  greedy: list[bool] | None = None,
                  lengths: list[int] | None = None, feed: list[int] | None = None,
                  feed_to: int | None = None) -> dict[str, Any]:
        """Execute this device's program for one step: ``actions`` are
        ``[stage, kind, microbatch]`` in order, kind ``F`` (forward), ``B`` (full
        backward), ``I`` (input gradient only) or ``W`` (weight gradient, after ``I``).

        Training leaves the gradients in place for ``commit``. Returns
        ``{"losses": {mb: float}}`` from the device holding the last stage when
        training, ``{"outputs": {mb: value}}`` when not, and ``{}`` elsewhere; with
        ``trace``, also ``{"spans": [[stage, kind, mb, start, end], ...]}``. With
        ``cache`` (inference), layers that have ``forward_cached`` keep their state
        (e.g. keys and values) under that id for the next call, until ``release``.
        With a list of ids (many requests, one row of the batch each), row ``i``
        continues the state of ``cache[i]``: a decode step (one new token per row;
        the state must exist), or with ``lengths`` a prefill call (row ``i`` brings
        ``lengths[i]`` tokens, right-padded to the longest; a new id starts a state).
        A row that fails (its state is gone, its sequence outgrew the model) fails
        alone: its output is zeros and ``{"row_errors": {row: message}}`` says why.
        ``greedy`` (rows of a causal LM): the last stage's output is then
        ``{"tokens": argmax of every row's last logits, "logits": the last logits of
        the rows not greedy}``, so the logits of greedy rows never travel.
        Decode steps run ahead (``_batching``): on the last stage, ``feed_to`` sends
        those tokens straight to the first stage as the input of step ``feed_to``; on
        the first stage, ``feed`` says, row by row, which of the tokens the step before
        sent it is this row's input (its index; -1: the row's own in ``inputs``).
        """
        device = self.link
        loop = asyncio.get_running_loop()
        program = _Program(step, actions, inputs or {}, targets or {}, train,
                           n_microbatches, loop.create_future())
        if trace:
            program.spans = []
        program.cache = cache
        program.greedy = greedy
        program.lengths = lengths
        program.feed = feed
        program.feed_to = feed_to
        device.submit(functools.partial(self._drive, program))
        try:
            await program.done
        finally:
            program.cancelled = True
            device.finish(step)
        result: dict[str, Any] = {}
        if program.losses:
            result["losses"] = program.losses
        if program.outputs:
            result["outputs"] = program.outputs
        if program.row_errors:
            result["row_errors"] = program.row_errors
        if program.spans is not None:
            result["spans"] = program.spans
        return result

    async def commit(self, snapshot: int | None = None,
                     keep_from: int | None = None) -> list[list[Any]]:
        """Apply the optimizer to the gradients the last ``run`` left (every device's
        ``run`` succeeded), once they are averaged over the replicas. With ``snapshot``,
        then copy the new state to host memory as that version; versions older than
        ``keep_from`` are dropped. Returns trace spans (with the last deferred
        snapshot's, which ran during the step).

        The snapshot is taken in the next bubble of this device (``_capture_soon``):
        the reply does not wait for it, and whatever reads it waits for it instead."""
        loop = asyncio.get_running_loop()
        captured = loop.create_future() if snapshot is not None else None

        def apply() -> list[list[Any]]:
            self.link.run_later()  # a deferred snapshot reads what this step changes
            spans = self._sync.wait() if self._sync is not None else []
            spans += self._later_spans
            self._later_spans = []
            t0 = time.time()
            if self.optimizer is not None:
                if self.check_finite:
                    for s in self.stages:
                        check_finite("weight gradient", s, None,
                                     (p.grad for p in self._parameters(s)))
                self.optimizer.step()
                # A fused optimizer writes the weights without bumping their versions,
                # which is how a cache of a function of a weight (the LM head's bf16
                # copy for greedy picks) learns that it changed
                torch.autograd.graph.increment_version(self._parameters())
            self.version += 1
            t1 = time.time()
            if keep_from is not None:
                self._snapshots.drop_below(keep_from)
            spans.append([self.stages[-1], "opt", -1, t0, t1])
            if snapshot is not None and captured is not None:
                self._capture_soon(snapshot, loop, captured)
            return spans
        spans = await self._on_device(apply)
        if snapshot is not None and captured is not None:
            # Only once the capture is scheduled: a commit that failed before it (a
            # lost replica in the all-reduce, a non-finite gradient) takes no snapshot,
            # and nobody must wait for one.
            self._captures[snapshot] = captured
            for old in sorted(self._captures)[:-self._snapshots.keep - 1]:
                del self._captures[old]
        return spans

    def _drive(self, program: _Program) -> None:
        """Device thread: run ``program`` from where it stopped, until it needs an input
        that has not arrived (it runs again when that input does) or it is done."""
        try:
            if program.cancelled:
                return
            sync = self._sync if program.train else None
            if program.train and program.pc == 0:
                # Training steps run one at a time: a newer one means every older one
                # was abandoned, even if word of that has not reached this actor yet.
                # Without this fence, a late input could wake an old step's program
                # and add its gradients to the new step's.
                stale = self._training
                self._training = program
                if stale is not None and stale is not program:
                    stale.cancelled = True
                    self.link.finish(stale.step)
            elif program.train and self._training is not program:
                return
            if program.pc == 0 and program.train:
                if sync is not None:
                    sync.zero()
                elif self.optimizer is not None:
                    self.optimizer.zero_grad(set_to_none=True)
            device, actions, last = self.link, program.actions, self.n_stages - 1
            spans = program.spans
            while program.pc < len(actions):
                s, kind, mb = actions[program.pc]
                final = sync is not None and program.final.get(s) == program.pc
                value = None
                if (kind == "F" and (s > 0 or program.feed is not None)) or \
                        (kind in "BI" and s < last):
                    got = device.take((program.step, "F" if kind == "F" else "B", s, mb),
                                      functools.partial(self._drive, program))
                    if got is None:
                        return
                    value, arrived = got
                    if spans is not None:
                        spans.append([s, "recv", mb, arrived, arrived])
                t0 = time.time()
                if final:
                    assert sync is not None
                    sync.arm(s)  # this backward makes the stage's gradients final
                out = self._op(program, s, kind, mb, value)
                if final:
                    assert sync is not None
                    sync.flush(s)
                t1 = time.time()
                self.busy_seconds += t1 - t0
                self.operations += 1
                if spans is not None:
                    spans.append([s, kind, mb, t0, t1])
                if out is not None:
                    to, key, payload = out
                    nbytes = device.send(self.links[to], key, payload)
                    if spans is not None:
                        spans.append([s, "send", mb, t1, time.time(), nbytes])
                program.pc += 1
                if program.cancelled:
                    return
            program.resolve(None)
        except Exception as exc:
            program.resolve(exc)

    def _op(self, program: _Program, s: int, kind: str, mb: int,
            value: Any) -> tuple[int, Key, Any] | None:
        """One forward or backward; returns what to send on: (stage, key, value)."""
        last = self.n_stages - 1
        if kind == "F":
            if s == 0:
                fed, value = value, program.inputs.get(mb)
                if value is None:
                    raise KeyError(f"stage 0 got no input for microbatch {mb}")
                if program.feed is not None:
                    value = _with_feed(value, program.feed, fed)
            value = _tree.map_tensors(value, _aligned)
            target = program.targets.get(mb) if s == last else None
            target = _tree.map_tensors(target, _aligned)
            x_leaves: list[torch.Tensor] = []
            loss: torch.Tensor | None = None
            cache = program.cache if not program.train else None
            # Greedy rows of the last stage: their tokens, not their logits (``pick``)
            greedy = program.greedy if s == last and not self.check_finite else None
            if isinstance(cache, list):
                y = self._forward_rows(s, value, cache, program.row_errors, program.lengths,
                                       greedy)
            elif cache is not None:
                y = self._forward_cached(s, value, cache)
            else:
                y, x_leaves, loss = self._forward(s, value, program.train, target,
                                                  program.n_microbatches)
            if self.check_finite:
                check_finite("loss" if loss is not None else "activation", s, mb,
                             [loss] if loss is not None else _tree.leaves(y))
            if s == last:
                if program.train:
                    assert loss is not None
                    program.losses[mb] = float(loss.detach()) * program.n_microbatches * \
                        self.replicas
                    program.saved[(s, mb)] = (x_leaves, loss)
                elif program.greedy is not None:
                    picked = program.outputs[mb] = y if greedy is not None and \
                        isinstance(cache, list) else pick_tokens(y, program.greedy)
                    if program.feed_to is not None:
                        return 0, (program.feed_to, "F", 0, mb), picked["tokens"]
                else:
                    program.outputs[mb] = y
            else:
                if program.train:
                    program.saved[(s, mb)] = (x_leaves, y)
                return s + 1, (program.step, "F", s + 1, mb), _detached(y)
            return None
        if kind == "W":
            split = program.split.pop((s, mb))
            backward_weight(split, self._parameters(s))
            return None
        x_leaves, y = program.saved.pop((s, mb))
        value = _tree.map_tensors(value, _aligned)
        if value is None and s < last:
            raise ValueError(f"stage {s} got no gradient for microbatch {mb}")
        if kind == "B":
            input_grads = backward_full(x_leaves, y, value)
        else:
            input_grads, program.split[(s, mb)] = backward_input(x_leaves, y, value,
                                                                 self._parameters(s))
        if self.check_finite:
            check_finite("gradient", s, mb, input_grads)
        if s > 0:
            return s - 1, (program.step, "B", s - 1, mb), input_grads
        return None

    def _forward(self, stage: int, x: Any, train: bool, target: Any,
                 n_microbatches: int) -> tuple[Any, list[torch.Tensor], torch.Tensor | None]:
        device = self.device
        module = self.chunks[stage]
        if not train:
            with torch.inference_mode():
                x = _tree.map_tensors(x, lambda t: t.to(device))
                return module(x), [], None
        if stage > 0:
            # A fresh leaf per input tensor: its .grad is what goes back upstream.
            x = _tree.map_tensors(x, lambda t: t.to(device).detach().requires_grad_(
                t.is_floating_point() or t.is_complex()))
        else:
            x = _tree.map_tensors(x, lambda t: t.to(device))
        x_leaves = _tree.leaves(x) if stage > 0 else []
        with torch.enable_grad():
            y = module(x)
            loss = None
            if stage == self.n_stages - 1:
                if self.loss_fn is None:
                    raise ValueError("training needs a loss_fn on the last stage")
                target = _tree.map_tensors(target, lambda t: t.to(device))
                # Mean over microbatches (and replicas, whose gradients are summed):
                # each microbatch contributes loss / (m x replicas).
                loss = self.loss_fn(y, target) / (n_microbatches * self.replicas)
        return y, x_leaves, loss

    def _forward_cached(self, stage: int, x: Any, cache_id: str) -> Any:
        """Inference that continues request ``cache_id``: its state lives here, on the
        device thread, until ``release`` or ``cache_idle_s`` without use."""
        now = time.monotonic()
        self._expire_caches()
        entry = self._caches.get(cache_id)
        if entry is None:
            why = self._gone(cache_id)
            if why is not None:
                raise LookupError(why)
            entry = self._caches[cache_id] = _Cache()
        entry.used = now
        layers = list(self.chunks[stage].children())
        states = entry.layers.setdefault(stage, [{} for _ in layers])
        with torch.inference_mode():
            x = _tree.map_tensors(x, lambda t: t.to(self.device))
            for layer, state in zip(layers, states, strict=True):
                cached = getattr(layer, "forward_cached", None)
                x = cached(x, state) if cached is not None else layer(x)
        return x

    def _forward_rows(self, stage: int, x: Any, cache_ids: list[str],
                      errors: dict[int, str], lengths: list[int] | None,
                      greedy: list[bool] | None = None) -> Any:
        """Many requests at once: row ``i`` of ``x`` continues request ``cache_ids[i]``;
        a decode step (``lengths`` ``None``: one token per row, every state must exist)
        or a prefill call (row ``i`` brings ``lengths[i]`` tokens, the rest pads it; a
        new request starts here). Layers with ``forward_cached_batch`` run the whole
        batch at once, others row by row (``run_rows``). A row whose state is missing
        here, or that makes a layer raise, fails alone (recorded in ``errors``; its
        output is zeros): one bad request must not fail the others it happens to share
        a call with. With ``greedy`` (the last stage), the result is what
        ``pick_tokens`` makes of the logits, which a last layer with ``pick`` (an LM
        head) gives by itself."""
        now = time.monotonic()
        self._expire_caches()
        layers = list(self.chunks[stage].children())
        good: list[int] = []
        rows: list[list[dict[str, Any]]] = []
        for i, cache_id in enumerate(cache_ids):
            if i in errors:
                continue  # failed upstream: its state here must not move on
            entry = self._caches.get(cache_id)
            if entry is None:
                why = self._gone(cache_id)
                if why is None and lengths is not None:
                    entry = self._caches[cache_id] = _Cache()
                else:
                    errors[i] = why or (f"request {cache_id} has no cached state here "
                                        "(never prefilled, or the stage was replaced)")
                    continue
            entry.used = now
            good.append(i)
            rows.append(entry.layers.setdefault(stage, [{} for _ in layers]))
        if not good:
            raise LookupError("; ".join(errors[i] for i in sorted(errors)))
        head = getattr(layers[-1], "pick", None) if greedy is not None else None
        with torch.inference_mode():
            x = _tree.map_tensors(x, lambda t: t.to(self.device))
            if head is None:
                y = run_rows(layers, x, rows, good, errors, lengths)
                return y if greedy is None else pick_tokens(y, greedy)
            # the head keeps no state: the rows before it as usual, then all at once
            h = run_rows(layers[:-1], x, [row[:-1] for row in rows], good, errors, lengths)
            picked: dict[str, torch.Tensor] = head(last_positions(h, lengths), greedy)
            return picked

    def _gone(self, cache_id: str) -> str | None:
        """Why a request whose state this stage dropped cannot go on, or ``None``.
        Continuing it from nothing would give wrong tokens, and a late call of a
        released one would leave a cache nobody frees."""
        if cache_id in self._expired:
            return (f"request {cache_id} was idle for over {self.cache_idle_s} s; its "
                    "cached state is gone")
        if cache_id in self._released:
            return f"request {cache_id} was released"
        return None

    def _expire_caches(self) -> None:
        """Device thread: drop the state of requests idle for ``cache_idle_s`` (abandoned
        without a release: a lost client, a crashed driver)."""
        now = time.monotonic()
        for key in [k for k, c in self._caches.items() if now - c.used > self.cache_idle_s]:
            del self._caches[key]
            self._expired[key] = None
            if len(self._expired) > 4096:
                del self._expired[next(iter(self._expired))]

    def release(self, cache_id: str) -> None:
        """Free what ``run(..., cache=cache_id)`` kept (the request ended)."""
        self.link.submit(functools.partial(self._drop_cache, cache_id))

    def _drop_cache(self, cache_id: str) -> None:
        self._caches.pop(cache_id, None)
        self._released[cache_id] = None
        if len(self._released) > 4096:
            del self._released[next(iter(self._released))]

    def cached_requests(self) -> int:
        return len(self._caches)

def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a copy of it when its memory is not 64-byte aligned (a view over a
    received frame often is not). CPU kernels take other code paths for unaligned
    data, which changes the last bits of a matmul: a stage computes the same bits for
    the same input only if the input is always aligned the same way."""
    if t.device.type == "cpu" and t.data_ptr() % 64:
        return t.clone(memory_format=torch.contiguous_format)
    return t


class _Cache:
    __slots__ = ("layers", "used")

    def __init__(self) -> None:
        self.layers: dict[int, list[dict[str, Any]]] = {}  # per stage, per layer
        self.used = time.monotonic()


class _Program:
    """One step (or inference call) on one device: its actions, how far the device
    thread got, what forward kept for backward, and the results."""

    def __init__(self, step: int, actions: list[list[Any]], inputs: dict[int, Any],
                 targets: dict[int, Any], train: bool, n_microbatches: int,
                 done: asyncio.Future[None]) -> None:
        self.step = step
        self.actions = actions
        self.inputs = inputs
        self.targets = targets
        self.train = train
        self.n_microbatches = n_microbatches
        self.pc = 0
        self.cancelled = False
        self.saved: dict[tuple[int, int], tuple[list[torch.Tensor], Any]] = {}
        self.split: dict[tuple[int, int], SplitBackward] = {}  # I done, W pending
        self.losses: dict[int, float] = {}
        self.outputs: dict[int, Any] = {}
        self.spans: list[list[Any]] | None = None  # [stage, kind, mb, start, end]
        self.cache: str | list[str] | None = None
        self.row_errors: dict[int, str] = {}  # decode step: rows that failed, and why
        self.greedy: list[bool] | None = None  # rows whose argmax is enough
        self.lengths: list[int] | None = None  # prefill call: real tokens of each row
        self.feed: list[int] | None = None     # rows whose input the step before sent
        self.feed_to: int | None = None        # the step this one's tokens go to
        self.done = done
        # per stage, the index of the action whose backward leaves its weight
        # gradients final (the last B or W): their all-reduce may start there
        self.final = {a[0]: i for i, a in enumerate(actions) if a[1] in ("B", "W")}

    def resolve(self, error: Exception | None) -> None:
        """From the device thread: the program finished (or failed with ``error``)."""
        settle(self.done.get_loop(), self.done, None, error)


def _with_feed(ids: torch.Tensor, feed: list[int], fed: Any) -> torch.Tensor:
    """The first stage's input ``[rows, 1]`` of a decode step run ahead: row ``i`` is
    token ``feed[i]`` of ``fed`` (the tokens of the step before), or its own where
    ``feed[i]`` is -1."""
    if not isinstance(fed, torch.Tensor) or fed.dim() != 1 or \
            max(feed) >= fed.shape[0] or len(feed) != ids.shape[0]:
        raise ValueError("the tokens of the step before do not match this step's rows")
    if feed == list(range(fed.shape[0])):  # the same rows go on: the usual step
        return fed.to(ids.device, ids.dtype).reshape(-1, 1)
    rows = [i for i, f in enumerate(feed) if f >= 0]
    ids = ids.clone()
    ids[rows, 0] = fed[[feed[i] for i in rows]].to(ids.device, ids.dtype)
    return ids


def _detached(y: Any) -> Any:
    """What travels downstream: values only, never the autograd graph."""
    return _tree.map_tensors(y, lambda t: t.detach())
