"""A model behind a pipeline and a batcher, with what the HTTP layer needs to know."""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import math
import os
import time
from collections.abc import AsyncGenerator
from types import TracebackType
from typing import Any

import anyio
import torch

from .._errors import ShardlineError
from ..models import Batcher, Pipeline, QueueFull, minilm
from ._metrics import ServeMetrics

__all__ = ["CompletionService", "EmbeddingService", "InputError"]


# Texts longer than this (in characters, all of a request's together) are tokenized on a
# worker thread: ~1 ms of tokenizing, about what the hop to a thread and back costs.
INLINE_CHARS = 4096


class InputError(ShardlineError, ValueError):
    """The request itself is wrong (HTTP 400): empty, not text, too long. ``code`` is
    OpenAI's error code for it, if it has one."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class EmbeddingService:
    """Sentence embeddings from all-MiniLM-L6-v2 over a pipeline: each text is one
    batcher request; a batch goes into the pipeline as a few length-sorted groups."""

    kind = "embeddings"

    def __init__(self, name: str, pipe: Pipeline, *, metrics: ServeMetrics,
                 max_batch: int = 32, max_wait_ms: float = 5.0, max_queue: int = 1024,
                 tokenizer: minilm.Tokenizer | None = None,
                 threads: int | None = None) -> None:
        self.name = name
        self.pipe = pipe
        self.metrics = metrics
        self.tokenizer = tokenizer or minilm.Tokenizer()
        self.threads = threads or os.cpu_count() or 2
        """Worker threads tokenizing long requests at once."""
        self._limiter: anyio.CapacityLimiter | None = None
        self.batcher: Batcher[list[int], torch.Tensor] = Batcher(
            self._run, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue)
        self.created = int(time.time())
        # a batch goes in as up to `groups` length-sorted pipeline calls of at least
        # `min_group` texts: less padding, and the calls overlap across stages
        self.groups = 2 * len(pipe.devices)
        self.min_group = 4

    async def __aenter__(self) -> EmbeddingService:
        self._limiter = anyio.CapacityLimiter(self.threads)
        await self.batcher.__aenter__()
        self.metrics.watch(self.batcher, self.pipe)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> bool | None:
        return await self.batcher.__aexit__(exc_type, exc, tb)

    async def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Each text's token ids (``InputError`` if one is longer than the model takes).
        Long texts go to a worker thread: the tokenizer runs without the GIL, so the
        event loop keeps answering (a million characters take about half a second)."""
        try:
            if sum(map(len, texts)) <= INLINE_CHARS or self._limiter is None:
                rows = self.tokenizer.encode(texts)
            else:
                rows = await anyio.to_thread.run_sync(self.tokenizer.encode, texts,
                                                      limiter=self._limiter)
        except TypeError as exc:  # what the tokenizer says of a lone surrogate
            raise InputError(f"the input cannot be tokenized: {exc}") from None
        for i, row in enumerate(rows):
            if len(row) > self.tokenizer.max_tokens:
                raise InputError(f"input[{i}] is {len(row)} tokens long; this model takes "
                                 f"at most {self.tokenizer.max_tokens}",
                                 code="context_length_exceeded")
        return rows

    async def embed(self, rows: list[list[int]]) -> list[torch.Tensor]:
        """One float32 vector per text, given as its token ids (``tokenize``); the first
        failure is raised as it is (``QueueFull``, ``PipelineError``), the rest of the
        request's texts finish unobserved."""
        return list(await asyncio.gather(*(self.batcher(r) for r in rows)))

    async def _run(self, rows: list[list[int]]) -> list[torch.Tensor]:
        """One batch: sorted by length and cut into groups that each pad only to their
        own longest text (as sentence-transformers' encode does); the groups go into
        the pipeline together and overlap there."""
        self.metrics.batch_size.observe(len(rows))
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        size = max(self.min_group, math.ceil(len(rows) / self.groups))
        groups = [order[i:i + size] for i in range(0, len(order), size)]
        outputs = await asyncio.gather(*(self._embed([rows[i] for i in group])
                                         for group in groups))
        vectors: dict[int, torch.Tensor] = {}
        for group, out in zip(groups, outputs, strict=True):
            vectors.update(zip(group, out, strict=True))
        return [vectors[i] for i in range(len(rows))]

    async def _embed(self, rows: list[list[int]]) -> torch.Tensor:
        result: Any = await self.pipe(minilm.pad(rows))
        assert isinstance(result, torch.Tensor)
        return result

    async def health(self, timeout: float) -> None:
        """One real request through every stage, bypassing the queue."""
        with anyio.fail_after(timeout):
            ids, mask = self.tokenizer(["health"])
            await self.pipe((ids, mask))


class CompletionService:
    """Text completions from a byte-level causal LM (``sl.models.gpt``: token = byte)
    over a pipeline; each request keeps its keys and values on the stages while it
    runs (``Pipeline.generate``)."""

    kind = "completions"

    def __init__(self, name: str, pipe: Pipeline, *, context: int, metrics: ServeMetrics,
                 max_queue: int = 1024) -> None:
        self.name = name
        self.pipe = pipe
        self.context = context
        self.metrics = metrics
        self.max_queue = max_queue
        self.active = 0
        self.created = int(time.time())

    async def __aenter__(self) -> CompletionService:
        self.metrics.watch(self, self.pipe)
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    @property
    def depth(self) -> int:
        return self.active

    def encode(self, prompt: str) -> list[int]:
        """The prompt's tokens (its UTF-8 bytes); ``InputError`` if it is empty, not
        valid Unicode, or leaves no room in the context."""
        try:
            data = prompt.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InputError(f"the prompt is not valid Unicode: {exc.reason} at "
                             f"character {exc.start}") from None
        if not data:
            raise InputError("the prompt is empty")
        if len(data) >= self.context:
            raise InputError(f"the prompt is {len(data)} tokens; this model's context is "
                             f"{self.context} tokens, including the completion",
                             code="context_length_exceeded")
        return list(data)

    async def complete(self, ids: list[int], max_tokens: int, *, temperature: float,
                       top_p: float, seed: int | None,
                       stop: list[str]) -> AsyncGenerator[tuple[str, str | None], None]:
        """``(text, finish_reason)`` pieces; the last one has a finish reason."""
        if self.active >= self.max_queue:
            raise QueueFull(f"{self.active} completions are running "
                            f"(max_queue={self.max_queue})")
        budget = min(max_tokens, self.context - len(ids))
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        held = ""  # text that could still turn out to start a stop sequence
        produced = 0
        self.active += 1
        try:
            async with contextlib.aclosing(self.pipe.generate(
                    ids, budget, temperature=temperature, top_p=top_p, seed=seed)) as tokens:
                async for token in tokens:
                    produced += 1
                    held += decoder.decode(bytes([token]))
                    cut = _stop_at(held, stop)
                    if cut is not None:
                        yield held[:cut], "stop"
                        return
                    keep = _stop_prefix(held, stop)
                    if len(held) > keep:
                        yield held[:len(held) - keep], None
                        held = held[len(held) - keep:]
            held += decoder.decode(b"", final=True)
            yield held, "length"
        finally:
            self.active -= 1
            self.metrics.tokens.inc(produced)

    async def health(self, timeout: float) -> None:
        with anyio.fail_after(timeout):
            await self.pipe(torch.zeros(1, 1, dtype=torch.int64))


def _stop_at(text: str, stop: list[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return min(found) if found else None


def _stop_prefix(text: str, stop: list[str]) -> int:
    """Length of the longest tail of ``text`` that begins some stop sequence."""
    longest = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest
