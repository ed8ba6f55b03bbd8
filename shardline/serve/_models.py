"""What ``--model`` names, resolved before anything starts: the ``LayerSpec`` the stages
build, whether it serves embeddings or completions, and its tokens."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..models import LayerSpec, gpt, hf, minilm, quantize
from ..models._checkpoint import checkpoint_spec
from ._tokens import ByteTokens, HFTokens, Tokens, TokensError

__all__ = ["ModelError", "Served", "resolve"]

log = logging.getLogger("shardline.serve")

GPT_FACTORY = "shardline.models.gpt:layers"


class ModelError(ValueError):
    """``--model`` names nothing this server can serve (the message is for the user)."""


@dataclass(frozen=True)
class Served:
    name: str
    """The model's id in the API."""
    kind: str
    """"embeddings" or "completions"."""
    spec: LayerSpec
    tokens: Tokens | None = None
    """For completions."""
    warning: str | None = None
    """Something the user must hear before the server starts (untrained weights)."""


def resolve(model: str, *, name: str | None = None, quantized: str | None = None) -> Served:
    """``minilm``, ``gpt``, ``gpt:DIR`` or ``hf:DIR``; ``quantized="int8"`` serves the
    weights in int8. Raises ``ModelError``."""
    kind, colon, where = model.partition(":")
    if kind == "minilm" and not colon:
        served = Served(name or "minilm", "embeddings", minilm.spec())
    elif kind == "gpt" and not colon:
        spec = gpt.spec()
        served = Served(name or "gpt", "completions", spec,
                        ByteTokens(int(spec.config["seq"])),
                        warning="--model gpt has no checkpoint: its weights are untrained "
                        "and it answers noise (give gpt:DIR for a trained one)")
    elif kind in ("gpt", "hf") and colon:
        if not where:
            raise ModelError(f"--model {model!r}: give the checkpoint directory after the "
                             f"colon ({kind}:DIR)")
        directory = Path(where)
        if not directory.is_dir():
            raise ModelError(f"--model {model}: {where} is not a directory")
        served = (_gpt(directory, name) if kind == "gpt" else _hf(directory, name))
    else:
        raise ModelError(f"unknown model {model!r}: minilm, gpt, gpt:DIR or hf:DIR")
    if quantized is None:
        return served
    try:
        compressed = quantize(served.spec, quantized)
    except (ValueError, OSError) as exc:
        raise ModelError(f"--quantize {quantized}: {exc}") from None
    log.info("%s quantized to %s: %s", served.name, quantized, compressed.report)
    return Served(served.name, served.kind, compressed.model, served.tokens, served.warning)


def _gpt(directory: Path, name: str | None) -> Served:
    try:
        spec = checkpoint_spec(directory)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"--model gpt:{directory}: not a checkpoint saved by "
                         f"Pipeline.save: {exc}") from None
    if spec.factory != GPT_FACTORY:
        raise ModelError(f"--model gpt:{directory}: a checkpoint of {spec.factory}, not of "
                         "the reference GPT (hf:DIR serves Hugging Face checkpoints)")
    return Served(name or "gpt", "completions", spec, ByteTokens(int(spec.config["seq"])))


def _hf(directory: Path, name: str | None) -> Served:
    try:
        spec = hf.spec(directory)
        config = hf.Checkpoint(directory).config
        context = config.get("max_position_embeddings") or config.get("n_positions")
        if not isinstance(context, int) or context < 2:
            raise ModelError(f"--model hf:{directory}: config.json gives no context length "
                             "(max_position_embeddings or n_positions)")
        tokens = HFTokens(directory, context=context, eos=spec.config.get("eos_token_id"))
    except (hf.CheckpointError, TokensError, OSError) as exc:
        raise ModelError(f"--model hf:{directory}: {exc}") from None
    return Served(name or directory.resolve().name, "completions", spec, tokens)
