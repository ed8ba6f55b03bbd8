"""A small GPT built as a flat sequence of layers, so it partitions naturally.

Layer 0 embeds tokens (plus learned positions), layers 1..n are transformer blocks,
the last layer is the final norm and the output head. ``layers(config, start, end)``
builds any contiguous slice, which is what a remote stage calls through
``LayerSpec("shardline.models.gpt:layers", config, n_layers(config))``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ._kvbatch import (
    append_rows,
    history,
    keep,
    last_positions,
    new_lengths,
    past_lengths,
    row_mask,
    row_positions,
)

__all__ = ["DEFAULT", "Block", "Embed", "Head", "batches", "corpus", "generate", "layers",
           "loss", "model", "n_layers", "spec"]

DEFAULT: dict[str, Any] = {"vocab": 256, "dim": 128, "heads": 4, "blocks": 4, "seq": 128,
                           "seed": 0}


def _cfg(config: dict[str, Any]) -> dict[str, Any]:
    return {**DEFAULT, **config}


class Embed(nn.Module):
    def __init__(self, vocab: int, dim: int, seq: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(seq, dim)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        out: torch.Tensor = self.tokens(idx) + self.positions(pos)
        return out

    def forward_cached(self, idx: torch.Tensor, cache: dict[str, Any]) -> torch.Tensor:
        """Embed tokens that continue a sequence of ``cache["pos"]`` tokens."""
        start = int(cache.get("pos", 0))
        end = start + idx.shape[1]
        if end > self.positions.num_embeddings:
            raise ValueError(f"sequence of {end} tokens exceeds the model's context of "
                             f"{self.positions.num_embeddings}")
        cache["pos"] = end
        pos = torch.arange(start, end, device=idx.device)
        out: torch.Tensor = self.tokens(idx) + self.positions(pos)
        return out

    def forward_cached_batch(self, idx: torch.Tensor, states: list[dict[str, Any]],
                             lengths: list[int] | None = None) -> torch.Tensor:
        """``forward_cached`` for many requests at once: row ``i`` of ``idx`` continues
        the sequence of ``states[i]`` with its first ``lengths[i]`` tokens (the rest
        pads the batch; ``None``: all are real)."""
        starts = [int(s.get("pos", 0)) for s in states]
        t = idx.shape[1]
        new = new_lengths(lengths, len(states), t)
        context = self.positions.num_embeddings
        end = max(a + n for a, n in zip(starts, new, strict=True))
        if end > context:  # before any state changes
            raise ValueError(f"sequence of {end} tokens exceeds the model's context of "
                             f"{context}")
        for state, start, n in zip(states, starts, new, strict=True):
            state["pos"] = start + n
        pos = row_positions(starts, t, idx.device).clamp(max=context - 1)  # padding
        out: torch.Tensor = self.tokens(idx) + self.positions(pos)
        return out


class Block(nn.Module):
    """Pre-norm transformer block with causal self-attention."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape[:2]
        # the attention is narrower than the block once heads are pruned (models.prune)
        q, k, v = self.qkv(self.norm1(x)).split(self.qkv.out_features // 3, dim=2)
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self._finish(x, att)

    def forward_cached(self, x: torch.Tensor, cache: dict[str, Any]) -> torch.Tensor:
        """``x`` continues the sequence whose keys and values ``cache`` holds (and gets)."""
        b, t = x.shape[:2]
        # the attention is narrower than the block once heads are pruned (models.prune)
        q, k, v = self.qkv(self.norm1(x)).split(self.qkv.out_features // 3, dim=2)
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        past = history(cache)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        keep(cache, k, v)
        if past is None:
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # new token i sits at position p + i and sees keys 0 .. p + i
            p = past[0].shape[2]
            seen = torch.ones(t, p + t, dtype=torch.bool, device=x.device).tril(p)
            att = F.scaled_dot_product_attention(q, k, v, attn_mask=seen)
        return self._finish(x, att)

    def forward_cached_batch(self, x: torch.Tensor, states: list[dict[str, Any]],
                             lengths: list[int] | None = None) -> torch.Tensor:
        """``forward_cached`` for many requests at once: row ``i`` of ``x`` continues the
        sequence whose keys and values ``states[i]`` holds (rows of any lengths) with
        its first ``lengths[i]`` positions (``None``: all)."""
        b, t = x.shape[:2]
        q, k, v = self.qkv(self.norm1(x)).split(self.qkv.out_features // 3, dim=2)
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        past = past_lengths(states)
        keys, values = append_rows(states, k, v, lengths)
        att = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=row_mask(past, t, None, x.device))
        return self._finish(x, att)

    def _finish(self, x: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        b, t = x.shape[:2]
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, -1))
        out: torch.Tensor = x + self.mlp(self.norm2(x))
        return out


class Head(nn.Module):
    def __init__(self, dim: int, vocab: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.out(self.norm(x))
        return logits

    def forward_cached(self, x: torch.Tensor, cache: dict[str, Any]) -> torch.Tensor:
        """Generation: the logits of the last position only (``[batch, 1, vocab]``)."""
        return self.forward(x[:, -1:])

    def forward_cached_batch(self, x: torch.Tensor, states: list[dict[str, Any]],
                             lengths: list[int] | None = None) -> torch.Tensor:
        """Each row's logits at its last real position: ``[rows, 1, vocab]``."""
        return self.forward(last_positions(x, lengths))


def n_layers(config: dict[str, Any] | None = None) -> int:
    return int(_cfg(config or {})["blocks"]) + 2


def layers(config: dict[str, Any], start: int, end: int) -> nn.Sequential:
    """Layers ``[start, end)``; each layer's initial weights depend only on the seed and
    its index, so every split of the model starts from the same weights."""
    c = _cfg(config)
    total = n_layers(c)
    if not 0 <= start < end <= total:
        raise ValueError(f"layer range [{start}, {end}) outside [0, {total})")
    out = []
    for i in range(start, end):
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(int(c["seed"]) * 1000 + i)
        try:
            if i == 0:
                layer: nn.Module = Embed(c["vocab"], c["dim"], c["seq"])
            elif i == total - 1:
                layer = Head(c["dim"], c["vocab"])
            else:
                layer = Block(c["dim"], c["heads"])
                for name, p in layer.named_parameters():
                    if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                        nn.init.normal_(p, std=0.02 / math.sqrt(2 * c["blocks"]))
        finally:
            torch.random.set_rng_state(gen_state)
        out.append(layer)
    return nn.Sequential(*out)


def model(config: dict[str, Any] | None = None) -> nn.Sequential:
    """The whole model (``layers(config, 0, n_layers(config))``)."""
    c = _cfg(config or {})
    return layers(c, 0, n_layers(c))


def spec(config: dict[str, Any] | None = None, weights: str | None = None) -> Any:
    """A ``LayerSpec`` for this GPT, for stages on any node."""
    from ._spec import LayerSpec

    c = _cfg(config or {})
    return LayerSpec("shardline.models.gpt:layers", c, n_layers(c), weights)


def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy over every position."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def corpus() -> torch.Tensor:
    """Text that ships with Python itself (pydoc's help topics) as byte tokens: a
    training set with nothing to download."""
    import pydoc_data.topics

    text = "\n".join(pydoc_data.topics.topics.values()).encode("utf-8", "replace")
    return torch.tensor(list(text), dtype=torch.long)


def batches(data: torch.Tensor, batch: int, seq: int,
            seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless random windows of ``data``: inputs and the same shifted by one token."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen).tolist()
        yield (torch.stack([data[s:s + seq] for s in starts]),
               torch.stack([data[s + 1:s + seq + 1] for s in starts]))


@torch.no_grad()
def generate(net: nn.Module, prompt: torch.Tensor, new_tokens: int, seq: int,
             temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample continuations with a local model (greedy when ``temperature == 0``)."""
    idx = prompt
    for _ in range(new_tokens):
        logits = net(idx[:, -seq:])[:, -1, :]
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            probs = F.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)
        idx = torch.cat([idx, nxt], dim=1)
    return idx
