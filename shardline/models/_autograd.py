"""The backward pass of one stage, whole (``B``) or split (``I`` then ``W``).

``I`` computes the gradient of the stage's input only: it is on the critical path (the
previous stage waits for it). ``W`` computes the weight gradients later, from what ``I``
kept, so a zero-bubble schedule can fill the pipeline's idle time with it. The split
uses torch.distributed.pipelining's own ``stage_backward_input`` / ``
stage_backward_weight`` when this torch has them: ``I`` records the gradients at the
boundaries of each weight's subgraph, and ``W`` runs only the weight-gradient nodes from
there. Older torch falls back to ``autograd.grad`` over the inputs (keeping the graph)
and a backward restricted to the weights, which is exact but recomputes the shared part.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from . import _tree

__all__ = ["SplitBackward", "backward_full", "backward_input", "backward_weight",
           "check_finite"]

try:
    from torch.distributed.pipelining._backward import (
        stage_backward_input as _torch_input,
    )
    from torch.distributed.pipelining._backward import (
        stage_backward_weight as _torch_weight,
    )
except ImportError:  # torch without the zero-bubble helpers
    _torch_input = None  # type: ignore[assignment]
    _torch_weight = None  # type: ignore[assignment]


class SplitBackward:
    """What ``backward_input`` leaves for ``backward_weight``."""

    __slots__ = ("grads", "outputs", "param_groups")

    def __init__(self, outputs: list[torch.Tensor], grads: list[torch.Tensor] | None,
                 param_groups: list[dict[str, Any]] | None) -> None:
        self.outputs = outputs
        self.grads = grads
        self.param_groups = param_groups


def _pairs(y: Any, grads: Sequence[torch.Tensor | None] | None
           ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """The outputs that carry a gradient, and those gradients (``None`` when ``y`` is the
    loss: its gradient is one)."""
    if grads is None:
        return [y], None
    outs, gs = [], []
    for t, g in zip(_tree.leaves(y), grads, strict=True):
        if g is not None and t.requires_grad:
            outs.append(t)
            gs.append(g.to(t.device))
    return outs, gs


def backward_full(x_leaves: list[torch.Tensor], y: Any,
                  grads: Sequence[torch.Tensor | None] | None) -> list[torch.Tensor | None]:
    """Weights and input together; returns the input gradients (what goes upstream)."""
    outs, gs = _pairs(y, grads)
    if outs:
        torch.autograd.backward(outs, gs)
    return [t.grad for t in x_leaves]


def backward_input(x_leaves: list[torch.Tensor], y: Any,
                   grads: Sequence[torch.Tensor | None] | None,
                   params: list[nn.Parameter]) -> tuple[list[torch.Tensor | None],
                                                         SplitBackward]:
    """Input gradients only; the weight gradients are left to ``backward_weight``."""
    outs, gs = _pairs(y, grads)
    if not outs or not x_leaves:
        # Nothing flows upstream (the first stage): the whole backward waits for W.
        return [None] * len(x_leaves), SplitBackward(outs, gs, None)
    if _torch_input is not None:
        _, groups = _torch_input(outs, gs, list(x_leaves), iter(params))
        return [t.grad for t in x_leaves], SplitBackward([], None, groups)
    needs = [t for t in x_leaves if t.requires_grad]
    found = torch.autograd.grad(outs, needs, gs, retain_graph=True, allow_unused=True)
    for t, g in zip(needs, found, strict=True):
        t.grad = g
    return [t.grad for t in x_leaves], SplitBackward(outs, gs, None)


def backward_weight(split: SplitBackward, params: list[nn.Parameter]) -> None:
    """Accumulate the weight gradients of a backward that ``backward_input`` began."""
    if split.param_groups is not None:
        assert _torch_weight is not None
        _torch_weight(iter(params), split.param_groups)
        return
    trainable = [p for p in params if p.requires_grad]
    if split.outputs and trainable:
        torch.autograd.backward(split.outputs, split.grads, inputs=trainable)


def check_finite(what: str, stage: int, mb: int | None,
                 tensors: Iterable[torch.Tensor | None]) -> None:
    """Raise ``FloatingPointError`` naming the stage and microbatch when a floating
    tensor holds a NaN or an infinity (``Pipeline.start(..., check_finite=True)``)."""
    for t in tensors:
        if t is None or not (t.is_floating_point() or t.is_complex()):
            continue
        if not bool(torch.isfinite(t).all()):
            where = f"stage {stage}" + (f", microbatch {mb}" if mb is not None else "")
            bad = int((~torch.isfinite(t)).sum())
            raise FloatingPointError(f"non-finite {what} at {where}: {bad} of {t.numel()} "
                                     "values are NaN or infinite")

