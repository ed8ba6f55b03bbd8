"""Models for the pipeline tests, buildable on any node by import path."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Wide(nn.Module):
    """Turns a tensor into a dict activation: two float members and an int mask."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.a = nn.Linear(dim, dim)
        self.b = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        mask = (x[:, :1] > 0).long()
        return {"h": self.a(x), "aux": torch.tanh(self.b(x)), "mask": mask}


class Mix(nn.Module):
    """Takes the dict (or, across processes, the same dict) and passes a tuple on."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, dim)

    def forward(self, x: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if isinstance(x, dict):
            h, aux, mask = x["h"], x["aux"], x["mask"]
        else:
            h, aux, mask = x
        return torch.tanh(self.lin(h)) + aux, aux * 2, mask


class Narrow(nn.Module):
    def __init__(self, dim: int, out: int) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, out)

    def forward(self, x: Any) -> torch.Tensor:
        h, aux, mask = x
        return self.lin(h + aux) + mask.float()


class Boom(nn.Module):
    """Identity, except that a batch of exactly 7 rows makes it raise."""

    def forward(self, x: Any) -> Any:
        first = x[0] if isinstance(x, (tuple, list)) else x
        if isinstance(first, torch.Tensor) and first.shape[0] == 7:
            raise RuntimeError("stage exploded on a batch of 7")
        return x


def _sleep_after(seconds: float) -> Any:
    """A forward hook that makes a layer take ``seconds`` longer (time to kill a node in
    the middle of a step) without changing its parameters or their names."""
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        import time

        time.sleep(seconds)
    return hook


def layers(config: dict[str, Any], start: int, end: int) -> nn.Sequential:
    """``config["kind"]``: ``"mlp"`` (Linear/Tanh), ``"tree"`` (dict/tuple activations),
    ``"boom"`` (mlp with a Boom layer at ``config["boom_at"]``); ``config["slow"]``
    seconds of sleep after every layer."""
    kind = config.get("kind", "mlp")
    dim, n = int(config.get("dim", 8)), int(config["n"])
    out = []
    for i in range(start, end):
        torch.manual_seed(1000 + i)
        layer: nn.Module
        if kind == "boom" and i == config.get("boom_at"):
            layer = Boom()
        elif kind == "tree":
            layer = Wide(dim) if i == 0 else Narrow(dim, 4) if i == n - 1 else Mix(dim)
        else:
            layer = nn.Linear(dim, 4 if i == n - 1 else dim)
            if i < n - 1:
                layer = nn.Sequential(layer, nn.Tanh())
        if config.get("slow"):
            layer.register_forward_hook(_sleep_after(float(config["slow"])))
        out.append(layer)
    return nn.Sequential(*out)


class SGDFailingAtStep(torch.optim.SGD):
    """SGD whose ``fail_at``-th step raises (a commit that fails before its snapshot)."""

    def __init__(self, params: Any, lr: float, fail_at: int) -> None:
        super().__init__(params, lr=lr)
        self._fail_at = fail_at
        self._steps = 0

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        self._steps += 1
        if self._steps == self._fail_at:
            raise RuntimeError("optimizer step failed on purpose")
        return super().step(closure)
