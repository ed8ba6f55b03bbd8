"""``quantize`` and ``prune``, for a module in this process or a ``LayerSpec`` whose
stages, wherever they run, build their layers compressed."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from .._spec import LayerSpec, import_path, load_shard_weights
from ._int8 import KERNELS, quantize_int8
from ._prune import STRUCTURES, prunable, prune_layers
from ._quality import Quality
from ._report import Compressed, CompressionReport, state_bytes

__all__ = ["FACTORY", "apply", "layers", "prune", "quantize"]

FACTORY = "shardline.models.compress:layers"
# A compressed spec is built on remote nodes, whose allow-list this factory cannot see:
# it only wraps factories every node allows.
_WRAPPABLE = "shardline.models"

Step = list[Any]  # ["int8", kernel] | ["prune", structured, amount]


def quantize(model: nn.Module | LayerSpec, scheme: str = "int8", *, kernel: str = "auto",
             quality: Quality | None = None, inplace: bool = False) -> Compressed:
    """Weight-only int8 with one scale per output channel (per row for embeddings):
    every ``nn.Linear``, ``nn.Embedding`` and transformers ``Conv1D`` layer.

    ``model``: an ``nn.Module`` (copied unless ``inplace``) or a ``LayerSpec`` (the
    result is a spec whose stages quantize their layers as they build them).
    ``kernel``: "auto" (int8 x int8 matmul on CPU, dequantized weights elsewhere),
    "int8mm" or "dequant". ``quality``: e.g. ``Cosine(inputs)``, measured on the
    original and on the result. Returns ``Compressed(model, report)``.
    """
    if scheme != "int8":
        raise ValueError(f"unknown quantization scheme {scheme!r}; supported: 'int8'")
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    return _compress(model, ["int8", kernel], "int8", quality, inplace)


def prune(model: nn.Module | LayerSpec, amount: float = 0.25, structured: str = "heads", *,
          quality: Quality | None = None, inplace: bool = False) -> Compressed:
    """Structured pruning of a fraction ``amount`` of every layer's attention heads
    (``structured="heads"``) or feed-forward hidden units (``"ffn"``), the least
    important by weight norm; the tensors shrink, so the saved model is smaller.
    ``model`` and ``quality`` as for ``quantize``. Returns ``Compressed(model, report)``.
    """
    if structured not in STRUCTURES:
        raise ValueError(f"structured must be one of {STRUCTURES}, got {structured!r}")
    if not 0 <= amount < 1:
        raise ValueError(f"amount is the fraction pruned, in [0, 1); got {amount}")
    return _compress(model, ["prune", structured, float(amount)],
                     f"prune {structured} {amount:g}", quality, inplace)


def apply(module: nn.Module, steps: list[Step], require: bool = True) -> nn.Module:
    """Run compression steps on ``module`` in place (returns it, or its replacement).
    ``require=False``: a prune step that finds no layer to prune is not an error (for
    a slice of a model, such as its embeddings)."""
    for step in steps:
        if step[0] == "int8":
            module = quantize_int8(module, str(step[1]))
        elif step[0] == "prune":
            prune_layers(module, float(step[2]), str(step[1]), require)
        else:
            raise ValueError(f"unknown compression step {step!r}")
    return module


def layers(config: dict[str, Any], start: int, end: int) -> nn.Sequential:
    """``LayerSpec`` factory: the wrapped spec's layers ``[start, end)``, compressed."""
    inner = LayerSpec.from_wire(config["spec"])
    # Not inner.build: this already runs under LayerSpec.build's (non-reentrant) lock.
    shard = import_path(inner.factory, (_WRAPPABLE,))(inner.config, start, end)
    if not isinstance(shard, nn.Sequential) or len(shard) != end - start:
        raise TypeError(f"{inner.factory}(config, {start}, {end}) must return an "
                        f"nn.Sequential of {end - start} layers")
    if inner.weights is not None:
        load_shard_weights(shard, inner.weights, start)
    out = apply(shard, [list(s) for s in config["steps"]], require=False)
    assert isinstance(out, nn.Sequential)
    return out


def _compress(model: nn.Module | LayerSpec, step: Step, method: str,
              quality: Quality | None, inplace: bool) -> Compressed:
    if isinstance(model, LayerSpec):
        return _compress_spec(model, step, method, quality)
    before = state_bytes(model)
    if inplace:  # the original must survive to be measured
        original = copy.deepcopy(model) if quality is not None else model
        target = model
    else:
        original, target = model, copy.deepcopy(model)
    compressed = apply(target, [step])
    return Compressed(compressed, _report(method, before, state_bytes(compressed), quality,
                                          original, compressed))


def _report(method: str, before: int, after: int, quality: Quality | None,
            original: nn.Module, compressed: nn.Module) -> CompressionReport:
    if quality is None:
        return CompressionReport(method, before, after)
    on_original, on_compressed = quality(original, compressed)
    return CompressionReport(method, before, after, quality.metric, on_original,
                             on_compressed)


def _compress_spec(spec: LayerSpec, step: Step, method: str,
                   quality: Quality | None) -> Compressed:
    if spec.factory == FACTORY:  # compressing a compressed spec: one more step
        inner = LayerSpec.from_wire(spec.config["spec"])
        steps = [*spec.config["steps"], step]
    else:
        inner, steps = spec, [step]
    module_name = inner.factory.partition(":")[0]
    if not (module_name == _WRAPPABLE or module_name.startswith(_WRAPPABLE + ".")):
        raise ValueError(f"a compressed LayerSpec can wrap factories under {_WRAPPABLE} "
                         f"(gpt, minilm, hf) only, not {inner.factory!r}: compress the "
                         "layers inside your own factory instead (compress.apply)")
    config: dict[str, Any] = {"spec": inner.to_wire(), "steps": steps}
    if "eos_token_id" in inner.config:  # Pipeline.generate reads it from the spec
        config["eos_token_id"] = inner.config["eos_token_id"]
    # Compression scales every layer alike, so the balance of the stages holds.
    out = LayerSpec(FACTORY, config, inner.n_layers, costs=inner.costs)
    # Bytes as the stages hold them, layer by layer so memory stays one layer's (a
    # tensor two stages hold, like tied embeddings and head, counts twice).
    before = after = found = 0
    for i in range(spec.n_layers):
        layer = spec.build(i, i + 1)
        before += state_bytes(layer)
        if step[0] == "prune":
            found += len(prunable(layer, str(step[1])))
        after += state_bytes(out.build(i, i + 1))
    if step[0] == "prune" and not found:
        raise ValueError(f"found no layers in {inner.factory} whose {step[1]} it can prune")
    if quality is None:
        return Compressed(out, CompressionReport(method, before, after))
    return Compressed(out, _report(method, before, after, quality,
                                   spec.build(0, spec.n_layers), out.build(0, out.n_layers)))
