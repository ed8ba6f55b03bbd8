"""A model behind a pipeline and a batcher, with what the HTTP layer needs to know."""

from __future__ import annotations

import asyncio
import math
import time
from types import TracebackType
from typing import Any

import anyio
import torch

from .._errors import ShardlineError
from ..models import Batcher, Pipeline, minilm
from ._metrics import ServeMetrics

__all__ = ["EmbeddingService", "InputError", "Unavailable"]


class InputError(ShardlineError, ValueError):
    """The request itself is wrong (HTTP 400): empty, not text, too long."""


class Unavailable(ShardlineError):
    """The model cannot answer now (HTTP 503): a stage failed or is unreachable."""


class EmbeddingService:
    """Sentence embeddings from all-MiniLM-L6-v2 over a pipeline: each text is one
    batcher request; a batch is tokenized (padded to its longest text) and run as one
    pipeline call."""

    kind = "embeddings"

    def __init__(self, name: str, pipe: Pipeline, *, metrics: ServeMetrics,
                 max_batch: int = 32, max_wait_ms: float = 5.0, max_queue: int = 1024,
                 tokenizer: minilm.Tokenizer | None = None) -> None:
        self.name = name
        self.pipe = pipe
        self.metrics = metrics
        self.tokenizer = tokenizer or minilm.Tokenizer()
        self.batcher: Batcher[str, torch.Tensor] = Batcher(
            self._run, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue)
        self.created = int(time.time())
        # a batch goes in as up to `groups` length-sorted pipeline calls of at least
        # `min_group` texts: less padding, and the calls overlap across stages
        self.groups = 2 * len(pipe.devices)
        self.min_group = 4

    async def __aenter__(self) -> EmbeddingService:
        await self.batcher.__aenter__()
        self.metrics.watch(self.batcher, self.pipe)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> bool | None:
        return await self.batcher.__aexit__(exc_type, exc, tb)

    def check(self, texts: list[str]) -> int:
        """Validate ``texts``; returns their token count (``InputError`` if too long)."""
        total = 0
        for i, text in enumerate(texts):
            n = self.tokenizer.count(text)
            if n > self.tokenizer.max_tokens:
                raise InputError(f"input[{i}] is {n} tokens long; this model takes at most "
                                 f"{self.tokenizer.max_tokens}")
            total += n
        return total

    async def embed(self, texts: list[str]) -> list[torch.Tensor]:
        """One float32 vector per text; the first failure is raised as it is
        (``QueueFull``, ``PipelineError``), the rest of the request's texts finish
        unobserved."""
        return list(await asyncio.gather(*(self.batcher(t) for t in texts)))

    async def _run(self, texts: list[str]) -> list[torch.Tensor]:
        """One batch: sorted by length and cut into groups that each pad only to their
        own longest text (as sentence-transformers' encode does); the groups go into
        the pipeline together and overlap there."""
        self.metrics.batch_size.observe(len(texts))
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        size = max(self.min_group, math.ceil(len(texts) / self.groups))
        groups = [order[i:i + size] for i in range(0, len(order), size)]
        outputs = await asyncio.gather(*(self._embed([texts[i] for i in group])
                                         for group in groups))
        rows: list[torch.Tensor] = list(texts)  # type: ignore[arg-type]
        for group, out in zip(groups, outputs, strict=True):
            for i, row in zip(group, out, strict=True):
                rows[i] = row
        return rows

    async def _embed(self, texts: list[str]) -> torch.Tensor:
        result: Any = await self.pipe(self.tokenizer(texts))
        assert isinstance(result, torch.Tensor)
        return result

    async def health(self, timeout: float) -> None:
        """One real request through every stage, bypassing the queue."""
        with anyio.fail_after(timeout):
            ids, mask = self.tokenizer(["health"])
            await self.pipe((ids, mask))
