"""Llama, Mistral and Qwen2: the same checkpoint layout (``model.embed_tokens``,
``model.layers.{i}``, ``model.norm``, ``lm_head``), rotary positions, RMSNorm; they
differ in their layer classes and in the sliding window (Mistral: every layer; Qwen2:
the layers ``layer_types`` marks)."""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from ._layers import Embeddings, Head

__all__ = ["BASE", "MLP_MATRICES", "MODEL_TYPES", "TOKEN_EMBEDDING", "decoder",
           "embeddings", "head", "rotary", "window"]

MODEL_TYPES = ("llama", "mistral", "qwen2")
BASE = "model."
TOKEN_EMBEDDING = "model.embed_tokens.weight"
# Weight matrices of the MLP (for the cost of a layer: ``_build.costs``).
MLP_MATRICES = 3

_CLASS_PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}


def _class(cfg: Any, suffix: str) -> Any:
    module = importlib.import_module(
        f"transformers.models.{cfg.model_type}.modeling_{cfg.model_type}")
    return getattr(module, _CLASS_PREFIX[cfg.model_type] + suffix)


def embeddings(cfg: Any) -> tuple[nn.Module, dict[str, str]]:
    return (Embeddings(nn.Embedding(cfg.vocab_size, cfg.hidden_size)),
            {"tokens.weight": TOKEN_EMBEDDING})


def decoder(cfg: Any, i: int) -> tuple[nn.Module, str]:
    return _class(cfg, "DecoderLayer")(cfg, i), f"model.layers.{i}."


def head(cfg: Any) -> tuple[nn.Module, dict[str, str]]:
    norm = _class(cfg, "RMSNorm")(cfg.hidden_size, eps=cfg.rms_norm_eps)
    module = Head(norm, nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False))
    return module, {"norm.weight": "model.norm.weight", "out.weight": "lm_head.weight"}


def rotary(cfg: Any) -> nn.Module | None:
    module: nn.Module = _class(cfg, "RotaryEmbedding")(config=cfg)
    return module


def window(cfg: Any, i: int) -> int | None:
    size = getattr(cfg, "sliding_window", None)
    if size is None:
        return None
    kinds = getattr(cfg, "layer_types", None)
    if kinds:  # Qwen2: only layers marked "sliding_attention" have a window
        return int(size) if kinds[i] == "sliding_attention" else None
    return int(size)
