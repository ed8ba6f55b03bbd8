"""Structured pruning that shrinks the tensors: whole attention heads, or hidden units
of the feed-forward block, in every layer it knows.

Importance is local to a layer, so any slice of a model prunes exactly as the whole
would (a remote stage prunes its own layers): a head's is the L2 norm of its slice of
the attention output projection; a hidden unit's the product of the norms of its
input row(s) and its output column. Each layer keeps the ``1 - amount`` most
important, in their original order.

Known layers: the demo GPT's ``Block``; transformers' Llama / Mistral / Qwen2
attention and MLP (heads go by key-value group, so grouped-query attention stays
consistent) and GPT-2's attention and MLP.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..gpt import Block
from ._int8 import Int8Embedding, Int8Linear

__all__ = ["STRUCTURES", "prunable", "prune_layers"]

STRUCTURES = ("heads", "ffn")

_Prune = Callable[[Any, float], None]


def prune_layers(module: nn.Module, amount: float, structured: str,
                 require: bool = True) -> int:
    """Prune every known layer under ``module`` in place; returns how many were
    pruned. With ``require``, finding none is a ``ValueError`` (a stage holding only
    embeddings has none, and that is fine)."""
    if structured not in STRUCTURES:
        raise ValueError(f"structured must be one of {STRUCTURES}, got {structured!r}")
    if not 0 <= amount < 1:
        raise ValueError(f"amount is the fraction pruned, in [0, 1); got {amount}")
    found = prunable(module, structured)
    if require and not found:
        raise ValueError(f"found no layers whose {structured} it can prune (the demo GPT's "
                         "Block; transformers Llama, Mistral, Qwen2 and GPT-2 layers)")
    for layer, prune in found:
        _refuse_quantized(layer)
        prune(layer, amount)
    return len(found)


def prunable(module: nn.Module, structured: str) -> list[tuple[nn.Module, _Prune]]:
    """The layers under ``module`` whose ``structured`` part can be pruned, each with
    the function that prunes it."""
    found = []
    for layer in module.modules():
        for matches, prune in _PRUNERS[structured]:
            if matches(layer):
                found.append((layer, prune))
                break
    return found


def _keep(scores: torch.Tensor, amount: float) -> torch.Tensor:
    """Indices of the most important ``1 - amount`` (at least one), ascending."""
    n = scores.numel()
    keep = max(1, n - round(amount * n))
    return scores.topk(keep).indices.sort().values


def _rows(layer: nn.Linear, idx: torch.Tensor) -> nn.Linear:
    out = nn.Linear(layer.in_features, len(idx), layer.bias is not None,
                    device=layer.weight.device, dtype=layer.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(layer.weight[idx])
        if layer.bias is not None:
            out.bias.copy_(layer.bias[idx])
    return out


def _cols(layer: nn.Linear, idx: torch.Tensor) -> nn.Linear:
    out = nn.Linear(len(idx), layer.out_features, layer.bias is not None,
                    device=layer.weight.device, dtype=layer.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(layer.weight[:, idx])
        if layer.bias is not None:
            out.bias.copy_(layer.bias)
    return out


def _spans(idx: torch.Tensor, width: int) -> torch.Tensor:
    """Units ``i * width .. (i + 1) * width`` for each ``i`` in ``idx``."""
    return (idx[:, None] * width + torch.arange(width)).reshape(-1)


def _refuse_quantized(layer: nn.Module) -> None:
    if any(isinstance(sub, (Int8Linear, Int8Embedding)) for sub in layer.modules()):
        raise ValueError("prune before quantizing: this layer's weights are already int8")


# -- the demo GPT ----------------------------------------------------------------------


def _gpt_heads(block: Any, amount: float) -> None:
    heads: int = block.heads
    inner = block.qkv.out_features // 3
    width = inner // heads
    scores = block.proj.weight.detach().reshape(-1, heads, width).norm(dim=(0, 2))
    idx = _spans(_keep(scores, amount), width)
    block.qkv = _rows(block.qkv, torch.cat([idx, idx + inner, idx + 2 * inner]))
    block.proj = _cols(block.proj, idx)
    block.heads = len(idx) // width


def _gpt_ffn(block: Any, amount: float) -> None:
    up, down = block.mlp[0], block.mlp[2]
    idx = _keep(up.weight.detach().norm(dim=1) * down.weight.detach().norm(dim=0), amount)
    block.mlp[0], block.mlp[2] = _rows(up, idx), _cols(down, idx)


# -- transformers Llama / Mistral / Qwen2 ----------------------------------------------


def _is_llama_attention(m: nn.Module) -> bool:
    return all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim",
                                       "num_key_value_groups"))


def _llama_heads(att: Any, amount: float) -> None:
    width: int = att.head_dim
    per_group: int = att.num_key_value_groups  # query heads sharing one key/value head
    groups = att.k_proj.out_features // width
    scores = att.o_proj.weight.detach().reshape(-1, groups, per_group * width).norm(dim=(0, 2))
    keep = _keep(scores, amount)
    q_idx = _spans(keep, per_group * width)
    kv_idx = _spans(keep, width)
    att.q_proj = _rows(att.q_proj, q_idx)
    att.k_proj = _rows(att.k_proj, kv_idx)
    att.v_proj = _rows(att.v_proj, kv_idx)
    att.o_proj = _cols(att.o_proj, q_idx)


def _is_gated_mlp(m: nn.Module) -> bool:
    return all(isinstance(getattr(m, a, None), nn.Linear)
               for a in ("gate_proj", "up_proj", "down_proj"))


def _gated_ffn(mlp: Any, amount: float) -> None:
    rows = mlp.gate_proj.weight.detach().norm(dim=1) * mlp.up_proj.weight.detach().norm(dim=1)
    idx = _keep(rows * mlp.down_proj.weight.detach().norm(dim=0), amount)
    mlp.gate_proj, mlp.up_proj = _rows(mlp.gate_proj, idx), _rows(mlp.up_proj, idx)
    mlp.down_proj = _cols(mlp.down_proj, idx)


# -- transformers GPT-2 (Conv1D: weight [in, out]) -------------------------------------


def _conv1d_out(conv: Any, idx: torch.Tensor) -> None:
    conv.weight = nn.Parameter(conv.weight.detach()[:, idx].clone())
    conv.bias = nn.Parameter(conv.bias.detach()[idx].clone())
    conv.nf = len(idx)


def _conv1d_in(conv: Any, idx: torch.Tensor) -> None:
    conv.weight = nn.Parameter(conv.weight.detach()[idx].clone())


def _is_gpt2_attention(m: nn.Module) -> bool:
    return (type(m).__name__ == "GPT2Attention" and not getattr(m, "is_cross_attention", True))


def _gpt2_heads(att: Any, amount: float) -> None:
    width: int = att.head_dim
    inner: int = att.split_size
    heads = inner // width
    scores = att.c_proj.weight.detach().reshape(heads, width, -1).norm(dim=(1, 2))
    idx = _spans(_keep(scores, amount), width)
    _conv1d_out(att.c_attn, torch.cat([idx, idx + inner, idx + 2 * inner]))
    _conv1d_in(att.c_proj, idx)
    att.split_size = len(idx)
    att.num_heads = len(idx) // width


def _is_gpt2_mlp(m: nn.Module) -> bool:
    return type(m).__name__ == "GPT2MLP"


def _gpt2_ffn(mlp: Any, amount: float) -> None:
    scores = mlp.c_fc.weight.detach().norm(dim=0) * mlp.c_proj.weight.detach().norm(dim=1)
    idx = _keep(scores, amount)
    _conv1d_out(mlp.c_fc, idx)
    _conv1d_in(mlp.c_proj, idx)


_PRUNERS: dict[str, list[tuple[Callable[[nn.Module], bool], _Prune]]] = {
    "heads": [(lambda m: isinstance(m, Block), _gpt_heads),
              (_is_llama_attention, _llama_heads),
              (_is_gpt2_attention, _gpt2_heads)],
    "ffn": [(lambda m: isinstance(m, Block), _gpt_ffn),
            (_is_gated_mlp, _gated_ffn),
            (_is_gpt2_mlp, _gpt2_ffn)],
}
