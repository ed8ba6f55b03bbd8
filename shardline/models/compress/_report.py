"""What compressing a model returns: the smaller model and a report on it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

from torch import nn

__all__ = ["Compressed", "CompressionReport", "state_bytes"]


@dataclass(frozen=True)
class CompressionReport:
    """Bytes of the weights before and after (what ``state_dict`` holds, a tensor shared
    by two modules counted once) and, when a quality measure was given, its figure on
    the original (``before``) and on the compressed model (``after``)."""

    method: str                  # "int8", "prune heads 0.25", ...
    bytes_before: int
    bytes_after: int
    metric: str | None = None    # "cosine" | "perplexity"
    before: float | None = None
    after: float | None = None

    @property
    def ratio(self) -> float:
        """``bytes_after / bytes_before``."""
        return self.bytes_after / self.bytes_before if self.bytes_before else 1.0

    @property
    def quality(self) -> float | None:
        """The quality figure of the compressed model (``after``)."""
        return self.after

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}


class Compressed(NamedTuple):
    """``quantize`` / ``prune`` results: ``model, report = sl.models.quantize(...)``.
    ``model`` is an ``nn.Module`` for a module, a ``LayerSpec`` for a spec."""

    model: Any
    report: CompressionReport


def state_bytes(module: nn.Module) -> int:
    """Bytes of ``module.state_dict()``, each storage counted once (tied weights)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for tensor in module.state_dict(keep_vars=True).values():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen and tensor.numel():
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total
