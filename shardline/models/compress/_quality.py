"""Quality figures for a compressed model, each measured on the original too."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["Cosine", "Perplexity", "Quality", "cosines"]


class Quality(Protocol):
    """A measure of a model: ``(on the original, on the compressed)``."""

    metric: str

    def __call__(self, original: nn.Module, compressed: nn.Module) -> tuple[float, float]: ...


@contextlib.contextmanager
def _evaluating(*models: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and no autograd, the models' modes restored after."""
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        with torch.inference_mode():
            yield
    finally:
        for m, mode in zip(models, modes, strict=True):
            m.train(mode)


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of matching output vectors (over the last dimension)."""
    return F.cosine_similarity(a.reshape(-1, a.shape[-1]).float(),
                               b.reshape(-1, b.shape[-1]).float(), dim=-1)


@dataclass(frozen=True)
class Cosine:
    """Mean cosine similarity between the compressed model's outputs on ``inputs`` and
    the original's (1.0 for the original itself): for embedding models."""

    inputs: Any
    metric: str = "cosine"

    def __call__(self, original: nn.Module, compressed: nn.Module) -> tuple[float, float]:
        with _evaluating(original, compressed):
            return 1.0, float(cosines(original(self.inputs), compressed(self.inputs)).mean())


@dataclass(frozen=True)
class Perplexity:
    """Perplexity of next-token prediction on ``tokens`` (1-D ids), read as
    non-overlapping windows of ``seq`` tokens: for language models whose output is
    logits ``[batch, time, vocab]``."""

    tokens: torch.Tensor
    seq: int = 128
    batch: int = 8
    metric: str = "perplexity"

    def __call__(self, original: nn.Module, compressed: nn.Module) -> tuple[float, float]:
        return self.of(original), self.of(compressed)

    def of(self, model: nn.Module) -> float:
        n = (self.tokens.numel() - 1) // self.seq
        if n < 1:
            raise ValueError(f"perplexity needs over {self.seq} tokens, got "
                             f"{self.tokens.numel()}")
        starts = [i * self.seq for i in range(n)]
        total, count = 0.0, 0
        with _evaluating(model):
            for b in range(0, n, self.batch):
                chunk = starts[b:b + self.batch]
                x = torch.stack([self.tokens[s:s + self.seq] for s in chunk])
                y = torch.stack([self.tokens[s + 1:s + self.seq + 1] for s in chunk])
                logits = model(x)
                total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                               y.reshape(-1), reduction="sum"))
                count += y.numel()
        return math.exp(total / count)
