"""How a remote node builds its shard without pickle: import paths plus plain config."""

from __future__ import annotations

import importlib
import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .._errors import Unauthorized

__all__ = ["LayerSpec", "import_path", "load_shard_weights"]

_BUILD_LOCK = threading.Lock()


@dataclass(frozen=True)
class LayerSpec:
    """A model described so any node can build any slice of it.

    ``factory`` ("pkg.mod:fn") is imported on the stage's node and called as
    ``fn(config, start, end)``; it returns an ``nn.Sequential`` of layers
    ``[start, end)``, and ``fn(config, 0, n_layers)`` is the whole model. ``weights``
    is an optional safetensors file (on the stage's node) with the whole model's
    state dict; each stage reads only its own layers' keys. ``costs`` (one positive
    number per layer, ``None``: all equal) is the relative compute of each layer,
    which ``Pipeline.start`` balances the stages by: a language model's embedding
    table holds as many parameters as its head but costs a lookup.
    """

    factory: str
    config: dict[str, Any] = field(default_factory=dict)
    n_layers: int = 0
    weights: str | None = None
    costs: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if ":" not in self.factory:
            raise ValueError(f"factory must be 'pkg.module:function', got {self.factory!r}")
        if self.n_layers < 1:
            raise ValueError("n_layers must be >= 1")
        if self.costs is not None:
            costs = tuple(float(c) for c in self.costs)
            if len(costs) != self.n_layers or not all(0 < c < math.inf for c in costs):
                raise ValueError(f"costs must be {self.n_layers} positive numbers, one "
                                 "per layer")
            object.__setattr__(self, "costs", costs)

    def to_wire(self) -> dict[str, Any]:
        return {"factory": self.factory, "config": self.config, "n_layers": self.n_layers,
                "weights": self.weights,
                "costs": list(self.costs) if self.costs is not None else None}

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> LayerSpec:
        costs = data.get("costs")
        return cls(str(data["factory"]), dict(data.get("config") or {}),
                   int(data["n_layers"]), data.get("weights"),
                   tuple(costs) if costs is not None else None)

    def build(self, start: int, end: int, allow: Sequence[str] | None = None) -> nn.Sequential:
        fn = import_path(self.factory, allow)
        # One build at a time per process: factories seed torch's global RNG to make
        # every split start from the same weights, and that RNG is shared by threads.
        with _BUILD_LOCK:
            shard = fn(self.config, start, end)
        if not isinstance(shard, nn.Sequential) or len(shard) != end - start:
            raise TypeError(f"{self.factory}(config, {start}, {end}) must return an "
                            f"nn.Sequential of {end - start} layers, got {type(shard).__name__}")
        if self.weights is not None:
            load_shard_weights(shard, self.weights, start)
        return shard


def load_shard_weights(shard: nn.Sequential, path: str | os.PathLike[str], start: int) -> None:
    """Load layers ``start..`` of a whole-model safetensors file into ``shard``,
    reading only this shard's tensors from disk."""
    from safetensors import safe_open

    wanted = {f"{start + int(k.split('.', 1)[0])}.{k.split('.', 1)[1]}": k
              for k in shard.state_dict()}
    tensors = {}
    with safe_open(os.fspath(path), framework="pt") as f:
        available = set(f.keys())
        missing = sorted(set(wanted) - available)
        if missing:
            raise KeyError(f"{path} lacks {len(missing)} keys of this shard, e.g. {missing[:3]}")
        for global_key, local_key in wanted.items():
            tensors[local_key] = f.get_tensor(global_key)
    shard.load_state_dict(tensors)


def import_path(path: str, allow: Sequence[str] | None = None) -> Callable[..., Any]:
    """Import ``"pkg.module:attr"`` (or ``"pkg.module.attr"``). With ``allow`` (a
    remote node's allow-list), only torch and the allowed modules may be imported."""
    if ":" in path:
        module_name, _, attr = path.partition(":")
    else:  # "torch.optim.AdamW" style
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"expected 'pkg.module:name' or 'pkg.module.name', got {path!r}")
    if allow is not None and not (
            module_name == "torch" or module_name.startswith("torch.")
            or any(module_name == a or module_name.startswith(a + ".") for a in allow)):
        raise Unauthorized(f"this node does not allow importing {module_name!r} "
                           f"(allowed: torch, {', '.join(allow) or 'nothing else'})")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{path} is not callable")
    return obj  # type: ignore[no-any-return]
