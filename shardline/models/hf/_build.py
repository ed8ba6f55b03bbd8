"""Building layers ``[start, end)`` of a checkpoint: the family's layer classes made on
the meta device, then given exactly their own tensors from the checkpoint."""

from __future__ import annotations

import inspect
import logging
from types import ModuleType
from typing import Any

import torch
from torch import nn

from . import gpt2, llama
from ._checkpoint import Checkpoint, CheckpointError
from ._layers import Decoder, Head

__all__ = ["FAMILIES", "costs", "family_of", "hf_config", "layers", "n_layers",
           "torch_dtype"]

log = logging.getLogger("shardline.models.hf")

FAMILIES: dict[str, ModuleType] = {t: fam for fam in (gpt2, llama) for t in fam.MODEL_TYPES}


def family_of(config: dict[str, Any]) -> ModuleType:
    model_type = config.get("model_type")
    family = FAMILIES.get(str(model_type))
    if family is None:
        raise CheckpointError(f"model_type {model_type!r} is not supported; supported: "
                              f"{', '.join(sorted(FAMILIES))}")
    return family


def n_layers(config: dict[str, Any]) -> int:
    """Embeddings, each decoder layer, norm + head (from ``config.json``)."""
    for key in ("num_hidden_layers", "n_layer"):  # GPT-2 spells it n_layer
        if key in config:
            return int(config[key]) + 2
    raise CheckpointError("config.json gives no num_hidden_layers")


def costs(config: dict[str, Any]) -> tuple[float, ...]:
    """Each stage layer's multiply-adds per token (from ``config.json``), which the
    pipeline balances its stages by: the embeddings are a lookup however large their
    table, a decoder layer its projections and MLP, the head a vocabulary-wide
    matmul."""
    family = family_of(config)

    def get(*keys: str, default: int | None = None) -> int:
        for key in keys:
            if config.get(key) is not None:
                return int(config[key])
        if default is None:
            raise CheckpointError(f"config.json gives none of {', '.join(keys)}")
        return default

    hidden = get("hidden_size", "n_embd")
    heads = get("num_attention_heads", "n_head")
    kv_heads = get("num_key_value_heads", default=heads)
    inner = get("intermediate_size", "n_inner", default=4 * hidden)
    head_dim = get("head_dim", default=hidden // heads)
    decoder = (2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
               + family.MLP_MATRICES * hidden * inner)
    vocab = get("vocab_size")
    return (float(hidden), *[float(decoder)] * (n_layers(config) - 2), float(hidden * vocab))


def hf_config(checkpoint: Checkpoint) -> Any:
    """The ``transformers`` config object of the checkpoint, attention through SDPA
    (the masks ``Decoder`` makes are SDPA's boolean ones)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(checkpoint.directory), local_files_only=True)
    cfg._attn_implementation = "sdpa"
    return cfg


def layers(config: dict[str, Any], start: int, end: int) -> nn.Sequential:
    """``LayerSpec`` factory: layers ``[start, end)`` of the checkpoint in
    ``config["path"]`` with its weights, in eval mode; ``config["dtype"]`` (a torch dtype
    name) casts them, ``None`` keeps the checkpoint's."""
    checkpoint = Checkpoint(config["path"])
    family = family_of(checkpoint.config)
    cfg = hf_config(checkpoint)
    total = n_layers(checkpoint.config)
    if not 0 <= start < end <= total:
        raise ValueError(f"layer range [{start}, {end}) outside [0, {total})")
    dtype = torch_dtype(config.get("dtype"))
    tied = bool(getattr(cfg, "tie_word_embeddings", False))

    built: list[nn.Module] = []
    rotary: nn.Module | None = None
    sources: list[dict[str, str]] = []  # per layer: local state key -> checkpoint name
    for i in range(start, end):
        with torch.device("meta"):
            if i == 0:
                module, names = family.embeddings(cfg)
            elif i == total - 1:
                module, names = family.head(cfg)
                if tied:
                    names = {**names, "out.weight": family.TOKEN_EMBEDDING}
            else:
                inner, prefix = family.decoder(cfg, i - 1)
                names = {f"layer.{k}": prefix + k for k in inner.state_dict()}
        if 0 < i < total - 1:  # rotary tables are computed at construction: not on meta
            if rotary is None:  # one for the stage: its layers share each call's tables
                rotary = family.rotary(cfg)
            module = Decoder(inner, rotary, family.window(cfg, i - 1), _cache_arg(inner))
        built.append(module)
        sources.append({k: _resolve(checkpoint, family, n) for k, n in names.items()})

    tensors = checkpoint.read({n for s in sources for n in s.values()})
    for module, source in zip(built, sources, strict=True):
        state = {k: tensors[n] if dtype is None else tensors[n].to(dtype)
                 for k, n in source.items()}
        module.load_state_dict(state, strict=True, assign=True)
        still_meta = [n for n, t in (*module.named_parameters(), *module.named_buffers())
                      if t.is_meta]
        if still_meta:
            raise CheckpointError(f"layer tensors {still_meta} were not in the checkpoint")
        if isinstance(module, Head):
            module.transpose_weight()
    if tied and start == 0 and end == total:  # one stage holds both ends: one tensor
        built[-1].out.weight = built[0].tokens.weight  # type: ignore[union-attr]
    log.debug("built layers [%d, %d) of %s from %d tensors", start, end,
              checkpoint.directory, len(tensors))
    seq = nn.Sequential(*built)
    seq.eval()  # checkpoints carry dropout rates; inference must not apply them
    return seq


def _resolve(checkpoint: Checkpoint, family: ModuleType, name: str) -> str:
    """``name`` as this checkpoint spells it: a bare base model's has no ``model.``
    / ``transformer.`` prefix."""
    if checkpoint.has(name):
        return name
    base: str = family.BASE
    if name.startswith(base) and checkpoint.has(name[len(base):]):
        return name[len(base):]
    if name == "lm_head.weight":
        raise CheckpointError(f"{checkpoint.directory} has no lm_head.weight and its config "
                              "does not tie the head to the embeddings")
    raise CheckpointError(f"{checkpoint.directory} has no tensor {name!r}")


def _cache_arg(layer: nn.Module) -> str:
    """The keyword a layer's ``forward`` takes its KV cache by (renamed during
    transformers 5.x)."""
    params = inspect.signature(type(layer).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def torch_dtype(name: Any) -> torch.dtype | None:
    if name is None:
        return None
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must name a torch floating-point dtype, got {name!r}")
    return dtype
