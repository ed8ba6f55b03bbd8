"""Cutting an ``nn.Sequential``-like model into contiguous stages."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Literal

from torch import nn

__all__ = ["balanced_bounds", "partition", "split_bounds"]


def _layers(module: nn.Module) -> list[nn.Module]:
    if isinstance(module, (nn.Sequential, nn.ModuleList)):
        return list(module)
    children = list(module.children())
    if not children:
        raise TypeError(f"{type(module).__name__} has no layers to split")
    return children


def split_bounds(n_layers: int, split_points: Sequence[int]) -> list[tuple[int, int]]:
    """``split_points`` are the layer indices where stages 1.. begin."""
    points = list(split_points)
    if points != sorted(set(points)) or (points and (points[0] <= 0 or points[-1] >= n_layers)):
        raise ValueError(f"split_points must be increasing and within 1..{n_layers - 1}, "
                         f"got {points}")
    edges = [0, *points, n_layers]
    return list(itertools.pairwise(edges))


def balanced_bounds(weights: Sequence[float], stages: int) -> list[tuple[int, int]]:
    """Contiguous ranges minimising the heaviest stage (exact dynamic programme)."""
    n = len(weights)
    if not 1 <= stages <= n:
        raise ValueError(f"cannot split {n} layers into {stages} stages")
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    inf = float("inf")
    # best[k][i]: least possible heaviest stage when the first i layers form k stages
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for i in range(k, n - (stages - k) + 1):
            for j in range(k - 1, i):
                cost = max(best[k - 1][j], prefix[i] - prefix[j])
                if cost < best[k][i]:
                    best[k][i], cut[k][i] = cost, j
    bounds, i = [], n
    for k in range(stages, 0, -1):
        j = cut[k][i]
        bounds.append((j, i))
        i = j
    return bounds[::-1]


def layer_weights(layers: Sequence[nn.Module], balance: str) -> list[float]:
    if balance == "params":
        # +1 so parameter-free layers (activations, dropout) still count for something
        return [1.0 + sum(p.numel() for p in layer.parameters()) for layer in layers]
    if balance == "layers":
        return [1.0] * len(layers)
    raise ValueError(f"balance must be 'params' or 'layers', got {balance!r}")


def partition(module: nn.Module, stages: int | None = None, *,
              split_points: Sequence[int] | None = None,
              balance: Literal["params", "layers"] = "params") -> list[nn.Sequential]:
    """Split ``module``'s layers into ``stages`` contiguous ``nn.Sequential`` shards
    (balanced by parameter count, or layer count), or at explicit ``split_points``.
    The shards share the original parameters (nothing is copied)."""
    layers = _layers(module)
    if (stages is None) == (split_points is None):
        raise ValueError("give exactly one of stages=N or split_points=[...]")
    if split_points is not None:
        bounds = split_bounds(len(layers), split_points)
    else:
        assert stages is not None
        bounds = balanced_bounds(layer_weights(layers, balance), stages)
    return [nn.Sequential(*layers[a:b]) for a, b in bounds]
