"""Making models cheaper to serve: weight-only int8 (``quantize``) and structured
pruning (``prune``), for a module or for a ``LayerSpec`` whose stages build their
layers compressed on whichever node they run.

    model, report = sl.models.quantize(net, "int8", quality=Cosine(inputs))
    report.bytes_before, report.bytes_after, report.ratio, report.quality
"""

from ._api import FACTORY, apply, layers, prune, quantize
from ._int8 import KERNELS, Int8Embedding, Int8Linear
from ._prune import STRUCTURES
from ._quality import Cosine, Perplexity, Quality, cosines
from ._report import Compressed, CompressionReport, state_bytes

__all__ = ["FACTORY", "KERNELS", "STRUCTURES", "Compressed", "CompressionReport", "Cosine",
           "Int8Embedding", "Int8Linear", "Perplexity", "Quality", "apply", "cosines", "layers",
           "prune", "quantize", "state_bytes"]
