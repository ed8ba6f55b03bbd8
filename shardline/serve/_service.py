"""A model behind a pipeline and a batcher, with what the HTTP layer needs to know."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections.abc import AsyncGenerator
from types import TracebackType
from typing import Any, NamedTuple

import anyio
import torch

from .. import LocalCluster
from .._errors import ShardlineError
from ..models import Batcher, Pipeline, QueueFull, minilm
from ._chat import TemplateError
from ._healing import Recovery
from ._metrics import ServeMetrics
from ._tokens import Tokens

__all__ = ["CompletionService", "EmbeddingService", "InputError", "Piece", "Unavailable"]


# Texts longer than this (in characters, all of a request's together) are tokenized on a
# worker thread: ~1 ms of tokenizing, about what the hop to a thread and back costs.
INLINE_CHARS = 4096


class InputError(ShardlineError, ValueError):
    """The request itself is wrong (HTTP 400): empty, not text, too long. ``code`` is
    OpenAI's error code for it, if it has one; ``param`` the field at fault, if it is
    not the one the endpoint reads its text from."""

    def __init__(self, message: str, code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.param = param


class Unavailable(ShardlineError):
    """The model cannot answer now (HTTP 503): a worker holding a stage of every copy
    is being replaced. ``retry_after``: seconds until it is likely back."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EmbeddingService:
    """Sentence embeddings from all-MiniLM-L6-v2 over a pipeline: each text is one
    batcher request; a batch goes into the pipeline as a few length-sorted groups."""

    kind = "embeddings"

    def __init__(self, name: str, pipe: Pipeline, *, metrics: ServeMetrics,
                 max_batch: int = 32, max_wait_ms: float = 5.0, max_queue: int = 1024,
                 tokenizer: minilm.Tokenizer | None = None,
                 threads: int | None = None, cluster: LocalCluster | None = None) -> None:
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
        self.groups = 2 * len(pipe.devices) * pipe.replicas
        self.min_group = 4
        self.recovery = Recovery(name, pipe, metrics, self._probe, cluster=cluster)

    async def __aenter__(self) -> EmbeddingService:
        self._limiter = anyio.CapacityLimiter(self.threads)
        await self.recovery.__aenter__()
        try:
            await self.batcher.__aenter__()
        except BaseException as exc:
            await self.recovery.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        self.metrics.watch(self.batcher, self.pipe)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> bool | None:
        try:
            return await self.batcher.__aexit__(exc_type, exc, tb)
        finally:
            await self.recovery.__aexit__(exc_type, exc, tb)

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
        request's texts finish unobserved. ``Unavailable`` at once while no copy of the
        model is whole."""
        _health(self.recovery, self.name)
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
        since = time.monotonic()
        result: Any = await self.pipe(minilm.pad(rows))
        assert isinstance(result, torch.Tensor)
        self.recovery.progress(since)
        return result

    async def health(self, timeout: float) -> None:
        """One real request through every stage, bypassing the queue; a slow one is
        excused if requests got through every stage meanwhile (a busy pipeline)."""
        _health(self.recovery, self.name)
        await self.recovery.check(timeout)

    async def _probe(self) -> None:
        await self.pipe(self.tokenizer(["health"]))


class CompletionService:
    """Text completions (and chat, when the tokenizer has a chat template) from a causal
    LM over a pipeline; each request keeps its keys and values on the stages while it
    runs (``Pipeline.generate``). ``tokens`` turns text into token ids and back: bytes
    for the reference GPT, a ``tokenizer.json`` for a Hugging Face checkpoint."""

    kind = "completions"

    def __init__(self, name: str, pipe: Pipeline, *, tokens: Tokens, metrics: ServeMetrics,
                 max_queue: int = 1024, cluster: LocalCluster | None = None) -> None:
        self.name = name
        self.pipe = pipe
        self.tokens = tokens
        self.context = tokens.context
        self.metrics = metrics
        self.max_queue = max_queue
        self.active = 0
        self.created = int(time.time())
        self.recovery = Recovery(name, pipe, metrics, self._probe, cluster=cluster)

    async def __aenter__(self) -> CompletionService:
        await self.recovery.__aenter__()
        self.metrics.watch(self, self.pipe)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.recovery.__aexit__(exc_type, exc, tb)

    @property
    def depth(self) -> int:
        return self.active

    @property
    def chat(self) -> bool:
        """Whether the tokenizer has a chat template (``/v1/chat/completions``)."""
        return self.tokens.chat is not None

    def encode(self, prompt: str) -> list[int]:
        """The prompt's tokens; ``InputError`` if it is empty or not valid Unicode."""
        _valid(prompt, "the prompt")
        if not prompt:
            raise InputError("the prompt is empty")
        return self.tokens.encode(prompt)

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        """The conversation rendered by the model's chat template, as tokens (the
        template writes the special tokens itself)."""
        if self.tokens.chat is None:
            raise InputError(f"the model '{self.name}' has no chat template; use "
                             "/v1/completions")
        for i, message in enumerate(messages):
            _valid(str(message.get("content") or ""), f"messages[{i}].content")
        try:
            text = self.tokens.chat.render(messages)
        except TemplateError as exc:
            raise InputError(str(exc)) from None
        return self.tokens.encode(text, special=False)

    def budget(self, prompt: list[int], max_tokens: int | None, default: int | None,
               param: str) -> int:
        """How many tokens to generate, OpenAI's way: a prompt that leaves no room, or
        a ``max_tokens`` that does not fit beside it, is ``context_length_exceeded``;
        without ``max_tokens``, ``default`` (``None``: the rest of the context) within
        the room there is."""
        room = self.context - len(prompt)
        if room < 1:
            raise InputError(f"This model's maximum context length is {self.context} "
                             f"tokens, however your prompt is {len(prompt)} tokens, which "
                             "leaves no room for the completion. Please reduce your "
                             "prompt.", code="context_length_exceeded", param=param)
        if max_tokens is None:
            return room if default is None else min(default, room)
        if max_tokens > room:
            raise InputError(f"This model's maximum context length is {self.context} "
                             f"tokens, however you requested {len(prompt) + max_tokens} "
                             f"tokens ({len(prompt)} in your prompt; {max_tokens} for the "
                             "completion). Please reduce your prompt; or completion "
                             "length.", code="context_length_exceeded", param="max_tokens")
        return max_tokens

    async def complete(self, ids: list[int], budget: int, *, temperature: float,
                       top_p: float, seed: int | None,
                       stop: list[str]) -> AsyncGenerator[Piece, None]:
        """Pieces of text as they are generated; the last one has a finish reason:
        "stop" (a stop sequence, or the model's end-of-sequence token, which is not
        part of the text) or "length" (``budget`` tokens)."""
        _health(self.recovery, self.name)
        if self.active >= self.max_queue:
            raise QueueFull(f"{self.active} completions are running "
                            f"(max_queue={self.max_queue})")
        decoder = self.tokens.decoder(ids)
        eos = self.tokens.eos
        held = ""  # text that could still turn out to start a stop sequence
        produced = 0
        since = time.monotonic()  # when the call that makes the next token went in
        self.active += 1
        try:
            async with contextlib.aclosing(self.pipe.generate(
                    ids, budget, temperature=temperature, top_p=top_p, seed=seed,
                    eos_token_id=sorted(eos))) as tokens:
                async for token in tokens:
                    produced += 1
                    self.recovery.progress(since)
                    since = time.monotonic()
                    if token in eos:
                        yield Piece(held + decoder.flush(), "stop", produced)
                        return
                    held += decoder.add(token)
                    cut = _stop_at(held, stop)
                    if cut is not None:
                        yield Piece(held[:cut], "stop", produced)
                        return
                    keep = _stop_prefix(held, stop)
                    if len(held) > keep:
                        yield Piece(held[:len(held) - keep], None, produced)
                        held = held[len(held) - keep:]
            held += decoder.flush()
            cut = _stop_at(held, stop)
            yield Piece(held if cut is None else held[:cut],
                        "length" if cut is None else "stop", produced)
        finally:
            self.active -= 1
            self.metrics.tokens.inc(produced)

    async def health(self, timeout: float) -> None:
        _health(self.recovery, self.name)
        await self.recovery.check(timeout)

    async def _probe(self) -> None:
        await self.pipe(torch.zeros(1, 1, dtype=torch.int64))


class Piece(NamedTuple):
    text: str
    finish_reason: str | None
    tokens: int
    """Tokens generated so far."""


def _valid(text: str, what: str) -> None:
    """JSON's ``\\ud800`` escape makes a Python string no UTF-8 can carry."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(f"{what} is not valid Unicode: {exc.reason} at character "
                         f"{exc.start}") from None


def _health(recovery: Recovery, name: str) -> None:
    if recovery.refusing():
        raise Unavailable(f"the model '{name}' is recovering: {recovery.describe()}",
                          recovery.retry_after())


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
