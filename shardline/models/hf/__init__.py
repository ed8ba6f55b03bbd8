"""Hugging Face decoder-only checkpoints (GPT-2, Llama, Mistral, Qwen2) as pipeline
stages.

``spec(path)`` describes a local checkpoint directory as ``embeddings | each decoder
layer | final norm + LM head``; every stage builds its layers from the ``transformers``
layer classes and reads only their tensors from the directory (on its own node, so the
directory must be there too). Nothing is downloaded.

    pipe = await Pipeline.start(node, sl.models.hf.spec("ckpt/llama"), stages=2)
    logits = await pipe(ids)                       # [batch, time, vocab]
    tokens = [t async for t in pipe.generate(ids[0], 32)]   # stops at the model's EOS
"""

from __future__ import annotations

import os
from pathlib import Path

from .._spec import LayerSpec
from ._build import FAMILIES, costs, family_of, layers, n_layers, torch_dtype
from ._checkpoint import Checkpoint, CheckpointError
from ._layers import Decoder, Embeddings, Head

__all__ = ["FAMILIES", "Checkpoint", "CheckpointError", "Decoder", "Embeddings", "Head",
           "layers", "n_layers", "spec"]


def spec(path: str | os.PathLike[str], *, dtype: str | None = None) -> LayerSpec:
    """A ``LayerSpec`` for the checkpoint directory ``path`` (``config.json`` plus
    ``model.safetensors`` or a sharded ``model.safetensors.index.json``).

    ``dtype`` ("bfloat16", "float32", ...) casts the weights as each stage loads them;
    ``None`` keeps the checkpoint's. The spec's config carries the model's
    ``eos_token_id`` (from ``generation_config.json``, else ``config.json``), where
    ``Pipeline.generate`` stops, and each layer's cost per token, which the stages are
    balanced by.
    """
    directory = Path(path).resolve()
    checkpoint = Checkpoint(directory)
    family_of(checkpoint.config)  # refuse an unknown family here, not on every stage
    torch_dtype(dtype)  # a bad name fails here, not on every stage
    config = {"path": str(directory), "dtype": dtype,
              "model_type": str(checkpoint.config["model_type"]),
              "eos_token_id": checkpoint.eos_token_id}
    return LayerSpec("shardline.models.hf:layers", config, n_layers(checkpoint.config),
                     costs=costs(checkpoint.config))
