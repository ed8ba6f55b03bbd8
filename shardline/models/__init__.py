"""The ML layer: partitioning, stage actors, schedules as data, the pipeline, batching,
reference models."""

from . import compress as compress
from . import gpt as gpt
from . import hf as hf
from . import minilm as minilm
from . import schedules as schedules
from ._batcher import Batcher as Batcher
from ._batcher import QueueFull as QueueFull
from ._errors import PipelineError as PipelineError
from ._errors import PlanError as PlanError
from ._errors import RecoveryFailed as RecoveryFailed
from ._partition import partition as partition
from ._pipeline import Pipeline as Pipeline
from ._plan import Plan as Plan
from ._spec import LayerSpec as LayerSpec
from ._stage import StageActor as StageActor
from ._trace import StepTrace as StepTrace
from ._trace import Trace as Trace
from ._trace import TraceSpan as TraceSpan
from .compress import Compressed as Compressed
from .compress import CompressionReport as CompressionReport
from .compress import prune as prune
from .compress import quantize as quantize

__all__ = ["Batcher", "Compressed", "CompressionReport", "LayerSpec", "Pipeline",
           "PipelineError", "Plan", "PlanError", "QueueFull", "RecoveryFailed", "StageActor",
           "StepTrace", "Trace", "TraceSpan", "compress", "gpt", "hf", "minilm", "partition",
           "prune", "quantize", "schedules"]
