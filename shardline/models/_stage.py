"""``StageActor``: one device's shard(s) of a pipelined model.

It runs the action list the scheduler sends for a step, takes activations and
gradients straight from its neighbours (``put``), and sends its own outputs straight
on: the scheduler never relays tensors. Torch work runs in a worker thread, one op
at a time per device, so the node keeps answering heartbeats and ``put``s meanwhile.
"""

from __future__ import annotations

import asyncio
import functools
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anyio
import torch
from torch import nn

from .. import Actor, ActorRef, to_thread
from . import _tree
from ._spec import LayerSpec, import_path

__all__ = ["StageActor"]

class StageActor(Actor):
    # run() of a step waits for inputs while put() delivers them, and inference calls
    # overlap: all are handled concurrently; compute is serialised on the device thread.
    max_concurrency = 256

    def __init__(self, device_index: int, stages: list[int], n_stages: int,
                 bounds: list[list[int]], layer_names: list[list[str]] | None = None,
                 modules: list[nn.Module] | None = None, spec: dict[str, Any] | None = None,
                 device: str = "cpu", optimizer: Sequence[Any] | None = None,
                 loss_fn: Any = None) -> None:
        self.device_index = device_index
        self.stages = list(stages)                 # virtual stages held, ascending
        self.n_stages = n_stages
        self.device = torch.device(device)
        self._modules = modules
        self._spec = spec
        self._bounds = bounds
        self._layer_names = layer_names
        self._optimizer_spec = optimizer
        self._loss_spec = loss_fn
        self.chunks: dict[int, nn.Module] = {}
        self.names: dict[int, list[str]] = {}
        self.optimizer: torch.optim.Optimizer | None = None
        self.loss_fn: Callable[..., torch.Tensor] | None = None
        self.peers: list[ActorRef] = []            # device actor of every virtual stage
        self._inbox: dict[tuple[int, str, int, int], Any] = {}
        self._arrived: dict[tuple[int, str, int, int], anyio.Event] = {}
        self._finished: set[int] = set()
        self._finished_order: deque[int] = deque()
        # One thread per device: torch work runs there in submission order, off the
        # event loop. Lighter per call than anyio's to_thread (no limiter, no
        # checkpoints), which matters at thousands of small stage operations a second.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"stage{device_index}")

    async def _compute(self, fn: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    async def on_stop(self) -> None:
        self._executor.shutdown(wait=False)

    async def on_start(self) -> None:
        # Building (and loading) a shard can take long: off the loop, so the node keeps
        # answering heartbeats.
        await to_thread(self._build)

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
            self.optimizer = opt_cls(self._parameters(), **dict(kwargs or {}))
        loss = self._loss_spec
        self.loss_fn = import_path(loss, allow) if isinstance(loss, str) else loss

    def _parameters(self) -> list[nn.Parameter]:
        return [p for s in self.stages for p in self.chunks[s].parameters()]

    def connect(self, peers: list[ActorRef]) -> None:
        """The device actor holding each virtual stage (index = stage)."""
        self.peers = list(peers)

    # -- data from neighbours ----------------------------------------------------------

    def put(self, step: int, kind: str, stage: int, mb: int, value: Any) -> None:
        """An activation (``kind="F"``: input of ``stage``'s forward) or a gradient
        (``"B"``: gradient of ``stage``'s output) for microbatch ``mb`` of ``step``."""
        if step in self._finished:
            return  # a late message for a step that failed or finished
        key = (step, kind, stage, mb)
        self._inbox[key] = value
        event = self._arrived.pop(key, None)
        if event is not None:
            event.set()

    async def _take(self, step: int, kind: str, stage: int, mb: int) -> Any:
        key = (step, kind, stage, mb)
        if key not in self._inbox:
            event = self._arrived.setdefault(key, anyio.Event())
            await event.wait()
        return self._inbox.pop(key)

    # -- a step --------------------------------------------------------------------------

    async def run(self, step: int, actions: list[list[Any]],
                  inputs: dict[int, Any] | None = None,
                  targets: dict[int, Any] | None = None, train: bool = True,
                  n_microbatches: int = 1) -> dict[str, Any]:
        """Execute this device's program for one step: ``actions`` are
        ``[stage, "F" | "B", microbatch]`` in order.

        Returns ``{"losses": {mb: float}}`` from the device holding the last stage when
        training, ``{"outputs": {mb: value}}`` when not, and ``{}`` elsewhere.
        """
        saved: dict[tuple[int, int], tuple[list[torch.Tensor], Any]] = {}
        result: dict[str, Any] = {}
        losses: dict[int, float] = {}
        outputs: dict[int, Any] = {}
        last = self.n_stages - 1
        try:
            if train and self.optimizer is not None:
                self.optimizer.zero_grad(set_to_none=True)
            for s, kind, mb in actions:
                if kind == "F":
                    if s == 0:
                        x = (inputs or {}).get(mb)
                        if x is None:
                            raise KeyError(f"stage 0 got no input for microbatch {mb}")
                    else:
                        x = await self._take(step, "F", s, mb)
                    target = (targets or {}).get(mb) if s == last else None
                    y, x_leaves, loss = await self._compute(
                        self._forward, s, x, train, target, n_microbatches)
                    if s == last:
                        if train:
                            assert loss is not None
                            losses[mb] = float(loss.detach()) * n_microbatches
                            saved[(s, mb)] = (x_leaves, loss)
                        else:
                            outputs[mb] = y
                    else:
                        if train:
                            saved[(s, mb)] = (x_leaves, y)
                        await self.peers[s + 1].tell("put", step, "F", s + 1, mb,
                                                     _detached(y))
                else:
                    grads = None if s == last else await self._take(step, "B", s, mb)
                    x_leaves, y = saved.pop((s, mb))
                    input_grads = await self._compute(self._backward, x_leaves, y, grads)
                    if s > 0:
                        await self.peers[s - 1].tell("put", step, "B", s - 1, mb, input_grads)
            if train and self.optimizer is not None:
                await self._compute(self.optimizer.step)
        finally:
            self._finish(step)
        if losses:
            result["losses"] = losses
        if outputs:
            result["outputs"] = outputs
        return result

    def _finish(self, step: int) -> None:
        self._finished.add(step)
        self._finished_order.append(step)
        if len(self._finished_order) > 4096:
            self._finished.discard(self._finished_order.popleft())
        for key in [k for k in self._inbox if k[0] == step]:
            del self._inbox[key]
        for key in [k for k in self._arrived if k[0] == step]:
            del self._arrived[key]

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
                # Mean over microbatches: each microbatch contributes loss / m.
                loss = self.loss_fn(y, target) / n_microbatches
        return y, x_leaves, loss

    @staticmethod
    def _backward(x_leaves: list[torch.Tensor], y: Any,
                  grads: list[torch.Tensor | None] | None) -> list[torch.Tensor | None]:
        if grads is None:  # last stage: y is the (scaled) loss
            y.backward()
        else:
            pairs = [(t, g) for t, g in zip(_tree.leaves(y), grads, strict=True)
                     if g is not None and t.requires_grad]
            if pairs:
                outs, gs = zip(*pairs, strict=True)
                gs = tuple(g.to(o.device) for o, g in zip(outs, gs, strict=True))
                torch.autograd.backward(list(outs), list(gs))
        return [t.grad for t in x_leaves]

    # -- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This device's parameters and buffers under the unsharded model's keys."""
        out: dict[str, torch.Tensor] = {}
        for s in self.stages:
            names = self.names[s]
            for key, value in self.chunks[s].state_dict().items():
                index, _, rest = key.partition(".")
                out[f"{names[int(index)]}.{rest}"] = value.detach().to("cpu").clone()
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
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

    def optimizer_state(self) -> dict[str, Any]:
        """Optimizer state keyed by unsharded parameter name, so a checkpoint does not
        depend on how the model was split."""
        if self.optimizer is None:
            return {"tensors": {}, "groups": []}
        sd = self.optimizer.state_dict()
        names = self._param_names()
        tensors: dict[str, torch.Tensor] = {}
        for index, fields in sd["state"].items():
            for field, value in fields.items():
                t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
                tensors[f"{names[index]}::{field}"] = t.detach().to("cpu").clone()
        groups = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
        return {"tensors": tensors, "groups": groups}

    def load_optimizer_state(self, tensors: dict[str, torch.Tensor],
                             groups: list[dict[str, Any]]) -> None:
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


def _detached(y: Any) -> Any:
    """What travels downstream: values only, never the autograd graph."""
    return _tree.map_tensors(y, lambda t: t.detach())
