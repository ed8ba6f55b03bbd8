"""Weight-only int8: linear and embedding layers with int8 weights and one float scale
per output channel (per row), ``w ~= qweight * scale[:, None]``.

The matmul, measured on CPU: dequantizing the weight per call is slower than the float
layer, while quantizing the activations per row on the fly and multiplying int8 by
int8 (``torch._int_mm``, int32 accumulation) is about 2-4x faster than float32 for a
384 x 1536 layer (1 to 4096 rows, one thread), at a per-row cosine of 0.9999 against
the dequantized product. (``torch.ao``'s dynamic quantized linear is as fast, but
torch 2.13 deprecates the quantized tensors it needs.) So on CPU the
"int8mm" kernel is the default; elsewhere (CUDA, where ``_int_mm`` has shape limits)
the weights are dequantized into the matmul ("dequant").
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["KERNELS", "Int8Embedding", "Int8Linear", "quantize_int8", "quantize_rows"]

KERNELS = ("auto", "int8mm", "dequant")
_ROWS = 256  # rows per int8 matmul block: its int32 result stays in cache


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax int8 per row: ``(qweight int8, scale float32)``."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """``nn.Linear`` with an int8 weight ``[out, in]`` and a float32 scale per output
    channel; the bias stays in its float dtype. ``weight`` gives the dequantized matrix
    for code that reads it directly."""

    qweight: torch.Tensor
    scale: torch.Tensor

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 kernel: str = "auto", dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.kernel = kernel
        self.dtype = dtype
        self.register_buffer("qweight", torch.zeros(out_features, in_features,
                                                    dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None,
                    kernel: str = "auto",
                    quantized: tuple[torch.Tensor, torch.Tensor] | None = None) -> Int8Linear:
        """From a float ``weight [out, in]``; ``quantized`` reuses an existing
        ``(qweight, scale)`` of the same matrix (a head tied to the embeddings)."""
        out_f, in_f = weight.shape
        layer = cls(in_f, out_f, bias is not None, kernel, weight.dtype)
        q, s = quantized if quantized is not None else quantize_rows(weight)
        layer.qweight, layer.scale = q.to(weight.device), s.to(weight.device)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return layer

    @property
    def weight(self) -> torch.Tensor:
        w: torch.Tensor = self.qweight.to(self.dtype) * self.scale.to(self.dtype)[:, None]
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._int8mm(x):
            return self._forward_int8mm(x)
        y = F.linear(x, self.qweight.to(x.dtype)) * self.scale.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y

    def _forward_int8mm(self, x: torch.Tensor) -> torch.Tensor:
        # Activations to int8 per row (token), int8 x int8 -> int32, then both scales
        # and the bias. In blocks of rows, so each int32 block is rescaled while it is
        # still in cache: unblocked, those passes over memory cost more than the matmul.
        flat = x.reshape(-1, x.shape[-1])
        x_scale = flat.abs().amax(dim=1, keepdim=True).float().clamp_(min=1e-12).div_(127.0)
        xq = (flat / x_scale).round_().to(torch.int8)
        out = torch.empty(flat.shape[0], self.out_features)
        weight_t = self.qweight.t()
        bias = self.bias.float() if self.bias is not None else None
        for i in range(0, flat.shape[0], _ROWS):
            block = out[i:i + _ROWS]
            torch.mul(torch._int_mm(xq[i:i + _ROWS], weight_t), x_scale[i:i + _ROWS], out=block)
            if bias is not None:
                torch.addcmul(bias, block, self.scale, out=block)
            else:
                block.mul_(self.scale)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def _int8mm(self, x: torch.Tensor) -> bool:
        if self.kernel == "dequant":
            return False
        return x.device.type == "cpu" and x.is_floating_point() and not x.requires_grad

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, kernel={self.kernel}")


class Int8Embedding(nn.Module):
    """``nn.Embedding`` with int8 rows and a float32 scale per row; looked-up rows are
    dequantized to ``dtype``. ``weight`` gives the dequantized table."""

    qweight: torch.Tensor
    scale: torch.Tensor

    def __init__(self, num_embeddings: int, embedding_dim: int,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.dtype = dtype
        self.register_buffer("qweight", torch.zeros(num_embeddings, embedding_dim,
                                                    dtype=torch.int8))
        self.register_buffer("scale", torch.ones(num_embeddings))

    @classmethod
    def from_weight(cls, weight: torch.Tensor,
                    quantized: tuple[torch.Tensor, torch.Tensor] | None = None
                    ) -> Int8Embedding:
        layer = cls(weight.shape[0], weight.shape[1], weight.dtype)
        q, s = quantized if quantized is not None else quantize_rows(weight)
        layer.qweight, layer.scale = q.to(weight.device), s.to(weight.device)
        return layer

    @property
    def weight(self) -> torch.Tensor:
        w: torch.Tensor = self.qweight.to(self.dtype) * self.scale.to(self.dtype)[:, None]
        return w

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.qweight).to(self.dtype)
        out: torch.Tensor = rows * self.scale[ids].to(self.dtype).unsqueeze(-1)
        return out

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a linear layer whose weight is ``[in, out]``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def quantize_int8(module: nn.Module, kernel: str = "auto") -> nn.Module:
    """Replace, in place, every ``nn.Linear``, ``nn.Embedding`` and transformers
    ``Conv1D`` under ``module`` by its int8 form; returns ``module`` (or its
    replacement when ``module`` itself is such a layer). A matrix shared by two layers
    (tied embeddings and head) is quantized once and stays shared."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    # id(float weight) -> (that weight, kept alive so its id stays its own; qweight; scale)
    done: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def shared(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        hit = done.get(id(w))
        return None if hit is None else (hit[1], hit[2])

    def convert(layer: nn.Module) -> nn.Module | None:
        if isinstance(layer, nn.Linear):
            w: torch.Tensor = layer.weight
            new: Int8Linear | Int8Embedding = Int8Linear.from_weight(w, layer.bias, kernel,
                                                                    shared(w))
        elif isinstance(layer, nn.Embedding):
            w = layer.weight
            new = Int8Embedding.from_weight(w, shared(w))
        elif _is_conv1d(layer):
            w = layer.get_parameter("weight")
            new = Int8Linear.from_weight(w.t(), getattr(layer, "bias", None), kernel)
        else:
            return None
        done.setdefault(id(w), (w, new.qweight, new.scale))
        new.train(layer.training)
        return new

    top = convert(module)
    if top is not None:
        return top
    for parent in list(module.modules()):
        for attr, child in list(parent.named_children()):
            replacement = convert(child)
            if replacement is not None:
                setattr(parent, attr, replacement)
    return module
