"""The three kinds of stage layer of a decoder-only LM: embeddings, one decoder layer,
final norm + LM head.

Between layers (and so between stages) only the hidden states travel: a float tensor
``[batch, time, hidden]``. Each decoder layer works out positions itself: ``0..t-1``
for a plain forward, and continuing after the keys it already holds for a cached one.
It then computes its rotary embeddings and mask from those positions, so nothing but
tensors crosses processes.

``forward_cached(x, state)`` is the per-request form ``Pipeline.generate`` uses: the
embeddings keep ``state["pos"]`` (tokens seen), each decoder layer its keys and values
(after rotary; ``_kvbatch.history`` reads them), the head keeps
nothing and computes the last position's logits only. ``forward_cached_batch(x,
states, lengths)`` runs many requests at once (continuous batching): row ``i`` of ``x``
continues ``states[i]`` with its first ``lengths[i]`` tokens (all when ``None``), rows of
any lengths (right-padded and masked, ``_kvbatch``); each row gets its own positions,
rotary embeddings and mask.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import nn

from .._greedy import Screen
from .._kvbatch import (
    append_rows,
    history,
    keep,
    last_positions,
    new_lengths,
    past_lengths,
    row_mask,
    row_positions,
)
from .._rows import pick_tokens, sampled_rows

__all__ = ["Decoder", "Embeddings", "Head", "causal_mask"]


class Embeddings(nn.Module):
    """Token embeddings, plus learned positions for the families that have them."""

    def __init__(self, tokens: nn.Embedding, positions: nn.Embedding | None = None) -> None:
        super().__init__()
        self.tokens = tokens
        self.positions = positions

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self._embed(ids, 0)

    def forward_cached(self, ids: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        start = int(state.get("pos", 0))
        out = self._embed(ids, start)
        state["pos"] = start + ids.shape[1]
        return out

    def forward_cached_batch(self, ids: torch.Tensor, states: list[dict[str, Any]],
                             lengths: list[int] | None = None) -> torch.Tensor:
        starts = [int(s.get("pos", 0)) for s in states]
        t = ids.shape[1]
        new = new_lengths(lengths, len(states), t)
        self._check(ids, max(a + n for a, n in zip(starts, new, strict=True)))
        for state, start, n in zip(states, starts, new, strict=True):  # checked first
            state["pos"] = start + n
        h: torch.Tensor = self.tokens(ids)
        if self.positions is not None:
            pos = row_positions(starts, t, ids.device)
            h = h + self.positions(pos.clamp(max=self.positions.num_embeddings - 1))
        return h

    def _embed(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        end = start + ids.shape[1]
        self._check(ids, end)
        h: torch.Tensor = self.tokens(ids)
        if self.positions is not None:
            h = h + self.positions(torch.arange(start, end, device=ids.device))
        return h

    def _check(self, ids: torch.Tensor, end: int) -> None:
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"the first stage takes token ids (int64), got {ids.dtype}")
        if self.positions is not None and end > self.positions.num_embeddings:
            raise ValueError(f"sequence of {end} tokens exceeds the model's context of "
                             f"{self.positions.num_embeddings}")


class Decoder(nn.Module):
    """One ``transformers`` decoder layer, fed the positions, mask and KV cache that
    the whole model would have given it."""

    def __init__(self, layer: nn.Module, rotary: nn.Module | None, window: int | None,
                 cache_arg: str) -> None:
        super().__init__()
        self.layer = layer
        self.rotary = rotary
        self.window = window
        self.cache_arg = cache_arg  # "cache" in transformers >= 5.3, "past_key_values" before

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self._run(h, None)

    def forward_cached(self, h: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        return self._run(h, state)

    def forward_cached_batch(self, h: torch.Tensor, states: list[dict[str, Any]],
                             lengths: list[int] | None = None) -> torch.Tensor:
        past = past_lengths(states)
        t = h.shape[1]
        key = (self.rotary, self.window, tuple(past), t, h.dtype, h.device)
        if _SAME_CALL.key == key:  # the layer before, in this call: its rows are ours
            mask, positions, rotary = _SAME_CALL.value
        else:
            mask = row_mask(past, t, self.window, h.device)
            positions = row_positions(past, t, h.device)
            rotary = self.rotary(h, positions) if self.rotary is not None else None
            _SAME_CALL.key, _SAME_CALL.value = key, (mask, positions, rotary)
        return self._call(h, mask, _RowsCache(states, lengths), positions, rotary)

    def _run(self, h: torch.Tensor, state: dict[str, Any] | None) -> torch.Tensor:
        past = past_lengths([state])[0] if state is not None else 0
        t = h.shape[1]
        return self._call(h, causal_mask(past, t, self.window, h.device),
                          _LayerCache(state) if state is not None else None,
                          torch.arange(past, past + t, device=h.device).unsqueeze(0))

    def _call(self, h: torch.Tensor, mask: torch.Tensor | None, cache: Any,
              positions: torch.Tensor, rotary: Any = None) -> torch.Tensor:
        kwargs: dict[str, Any] = {"attention_mask": mask, self.cache_arg: cache}
        if self.rotary is not None:
            kwargs["position_ids"] = positions
            kwargs["position_embeddings"] = rotary if rotary is not None else \
                self.rotary(h, positions)
        out = self.layer(h, **kwargs)
        if isinstance(out, tuple):  # older layers return (hidden_states, ...)
            out = out[0]
        result: torch.Tensor = out
        return result


class _SameCall(threading.local):
    """The mask, positions and rotary embeddings of the last batched call of this thread
    (a stage's device thread): the next decoder layer of the same call, which shares
    the rotary module (``_build``), has the same rows at the same positions and takes
    them as they are. The key holds the rotary module itself, so a module gone and
    another at its address can never match."""

    key: tuple[Any, ...] | None = None
    value: tuple[Any, ...] = ()


_SAME_CALL = _SameCall()


class Head(nn.Module):
    """Final norm and LM head: hidden states to logits ``[batch, time, vocab]``."""

    def __init__(self, norm: nn.Module, out: nn.Linear) -> None:
        super().__init__()
        self.norm = norm
        self.out = out
        self.screen = Screen()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.out(self.norm(h))
        return logits

    def transpose_weight(self) -> None:
        """Keep the head's weight (``[vocab, hidden]``, the same values) column-major.

        ``nn.Linear`` computes ``h @ weight.T``; with this layout ``weight.T`` is a
        row-major ``[hidden, vocab]`` matrix, which MKL multiplies by a few rows 1.4x
        (16 rows) to 3x (one row) faster than the usual layout on this project's CPUs,
        and to the same bits from 5 rows up. The head is most of a small model's
        decode step: a vocabulary-wide matmul for every new token."""
        weight = self.out.weight
        self.out.weight = nn.Parameter(weight.detach().t().contiguous().t(),
                                       requires_grad=weight.requires_grad)

    def pick(self, h: torch.Tensor, greedy: list[bool]) -> dict[str, torch.Tensor]:
        """``pick_tokens`` of this head's logits for the last positions ``h`` (``[rows,
        1, hidden]``), without the fp32 logits of greedy rows where ``Screen`` finds
        their argmax faster."""
        if not self._screens() or all(not g for g in greedy):
            return pick_tokens(self.forward(h), greedy)
        x = self.norm(h)[:, -1]
        tokens = self.screen.tokens(x, self.out.weight.t(), self.out.weight)
        if tokens is None:
            return pick_tokens(self.out(x).unsqueeze(1), greedy)
        return {"tokens": tokens, "logits": self.out(sampled_rows(x, greedy))}

    def prepare_pick(self) -> None:
        """What ``pick`` needs, made now (a stage that will serve, once its layers are on
        their device) rather than in the first request's time."""
        if self._screens():
            self.screen.prepare(self.out.weight.t(), self.out.weight)

    def _screens(self) -> bool:
        weight = self.out.weight
        return type(self.out) is nn.Linear and self.out.bias is None and \
            weight.dtype == torch.float32 and weight.device.type == "cpu"

    def forward_cached(self, h: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        """Generation: the logits of the last position only (``[batch, 1, vocab]``),
        all it needs, as ``transformers``' ``logits_to_keep=1``; a long prompt's other
        positions would cost a head matmul and a ``vocab``-wide row each."""
        return self.forward(h[:, -1:])

    def forward_cached_batch(self, h: torch.Tensor, states: list[dict[str, Any]],
                             lengths: list[int] | None = None) -> torch.Tensor:
        return self.forward(last_positions(h, lengths))


def causal_mask(past: int, t: int, window: int | None,
                device: torch.device) -> torch.Tensor | None:
    """Which keys each of ``t`` new queries (after ``past`` cached tokens) sees, as a
    boolean ``[1, 1, t, past + t]`` mask, or ``None`` where the attention kernel's own
    rule is the same (a whole causal prompt, or one new token seeing everything)."""
    total = past + t
    windowed = window is not None and total > window
    if not windowed and (past == 0 or t == 1):
        return None  # SDPA: is_causal for a prompt, all keys for a single query
    q = torch.arange(past, total, device=device).unsqueeze(1)
    k = torch.arange(total, device=device).unsqueeze(0)
    keep = k <= q
    if window is not None:
        keep &= q - k < window  # transformers' sliding window: the last `window` tokens
    return keep[None, None]


class _LayerCache:
    """The one method of a ``transformers`` cache a self-attention layer calls, over
    this request's ``state`` dict, so the keys and values stay plain tensors."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        past = history(self.state)
        if past is not None:
            keys = torch.cat([past[0], keys], dim=2)
            values = torch.cat([past[1], values], dim=2)
        keep(self.state, keys, values)
        return keys, values


class _RowsCache:
    """``_LayerCache`` for a batch of requests: row ``i`` appends to ``states[i]``; the
    layer attends over the right-padded batch (``row_mask`` hides the padding)."""

    def __init__(self, states: list[dict[str, Any]], lengths: list[int] | None) -> None:
        self.states = states
        self.lengths = lengths

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return append_rows(self.states, keys, values, self.lengths)
