"""Choosing the next token from logits."""

from __future__ import annotations

import torch

__all__ = ["sample"]


def sample(logits: torch.Tensor, temperature: float, top_p: float,
           generator: torch.Generator) -> int:
    """Greedy for ``temperature == 0``; else a draw from ``softmax(logits / temperature)``
    restricted to the smallest set of tokens whose probability reaches ``top_p``."""
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
    logits = logits.detach().float().cpu()
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        ordered, index = probs.sort(descending=True)
        before = ordered.cumsum(0) - ordered  # mass of the more likely tokens
        ordered[before >= top_p] = 0  # the top token always stays
        probs = torch.zeros_like(probs).scatter_(0, index, ordered)
    return int(torch.multinomial(probs, 1, generator=generator))
