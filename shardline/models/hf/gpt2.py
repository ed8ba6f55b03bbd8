"""GPT-2: learned positions, ``transformer.h.{i}`` blocks, ``ln_f`` and a head tied to
``wte`` unless the checkpoint has its own ``lm_head.weight``."""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from ._layers import Embeddings, Head

__all__ = ["BASE", "MLP_MATRICES", "MODEL_TYPES", "TOKEN_EMBEDDING", "decoder",
           "embeddings", "head", "rotary", "window"]

MODEL_TYPES = ("gpt2",)
BASE = "transformer."  # GPT2LMHeadModel's prefix; a bare GPT2Model's checkpoint has none
TOKEN_EMBEDDING = "transformer.wte.weight"
# Weight matrices of the MLP (for the cost of a layer: ``_build.costs``).
MLP_MATRICES = 2


def embeddings(cfg: Any) -> tuple[nn.Module, dict[str, str]]:
    module = Embeddings(nn.Embedding(cfg.vocab_size, cfg.hidden_size),
                        nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size))
    return module, {"tokens.weight": TOKEN_EMBEDDING,
                    "positions.weight": "transformer.wpe.weight"}


def decoder(cfg: Any, i: int) -> tuple[nn.Module, str]:
    block = importlib.import_module("transformers.models.gpt2.modeling_gpt2").GPT2Block
    return block(cfg, layer_idx=i), f"transformer.h.{i}."


def head(cfg: Any) -> tuple[nn.Module, dict[str, str]]:
    module = Head(nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon),
                  nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False))
    return module, {"norm.weight": "transformer.ln_f.weight",
                    "norm.bias": "transformer.ln_f.bias", "out.weight": "lm_head.weight"}


def rotary(cfg: Any) -> nn.Module | None:
    return None  # positions are learned embeddings, added in the first layer


def window(cfg: Any, i: int) -> int | None:
    return None
