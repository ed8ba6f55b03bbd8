"""Activations that are a tensor or nested tuples/lists/dicts of tensors."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["cat", "leaves", "map_tensors", "split"]


def leaves(obj: Any) -> list[torch.Tensor]:
    """Tensors inside ``obj``, depth first (dict values in insertion order)."""
    out: list[torch.Tensor] = []

    def walk(o: Any) -> None:
        if isinstance(o, torch.Tensor):
            out.append(o)
        elif isinstance(o, (tuple, list)):
            for item in o:
                walk(item)
        elif isinstance(o, dict):
            for item in o.values():
                walk(item)

    walk(obj)
    return out


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


def split(obj: Any, n: int) -> list[Any]:
    """``n`` microbatches along dim 0 (sizes differ by at most one, as
    ``torch.tensor_split``); non-tensor leaves are shared by every microbatch."""
    tensors = leaves(obj)
    if not tensors:
        raise ValueError("a batch needs at least one tensor to split into microbatches")
    size = tensors[0].shape[0] if tensors[0].dim() else 0
    if size < n:
        raise ValueError(f"batch of {size} cannot be split into {n} microbatches")
    columns = [torch.tensor_split(t, n) for t in tensors]
    return [_replace_leaves(obj, [col[i] for col in columns]) for i in range(n)]


def _replace_leaves(obj: Any, new: list[torch.Tensor]) -> Any:
    """``obj`` with its tensors replaced, in ``leaves`` order, by ``new``."""
    it = iter(new)
    return map_tensors(obj, lambda _old: next(it))


def cat(parts: Sequence[Any]) -> Any:
    """Inverse of ``split`` for outputs: concatenate matching tensors along dim 0."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(list(parts))
    if isinstance(first, (tuple, list)):
        joined = [cat([p[i] for p in parts]) for i in range(len(first))]
        return tuple(joined) if isinstance(first, tuple) else joined
    if isinstance(first, dict):
        return {k: cat([p[k] for p in parts]) for k in first}
    return first
