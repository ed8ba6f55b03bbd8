"""``Batcher``: many callers' requests, one pipeline call per batch."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Generic, TypeVar

import anyio
from anyio.abc import TaskGroup

from .._errors import ShardlineError

__all__ = ["Batcher", "QueueFull"]

T = TypeVar("T")
R = TypeVar("R")


class QueueFull(ShardlineError):
    """The batcher already holds ``max_queue`` requests: shed load (HTTP 429/503)."""


class Batcher(Generic[T, R]):
    """Gathers requests until ``max_batch`` are waiting or the oldest has waited
    ``max_wait_ms``, then runs ``fn(items)`` once and hands result ``i`` to caller ``i``.

    ``fn`` does the padding and the splitting (e.g. tokenize texts to the longest one,
    run the pipeline, return one row per text). Up to ``max_inflight`` batches run at
    once, so consecutive batches overlap in a pipeline. If ``fn`` raises, every caller
    of that batch gets the exception. Use it as an async context manager::

        async with Batcher(embed_batch, max_batch=32, max_wait_ms=5) as batcher:
            vector = await batcher(text)
    """

    def __init__(self, fn: Callable[[list[T]], Awaitable[Sequence[R]]], *,
                 max_batch: int = 32, max_wait_ms: float = 5.0, max_queue: int = 1024,
                 max_inflight: int = 4) -> None:
        if max_batch < 1 or max_queue < 1 or max_inflight < 1 or max_wait_ms < 0:
            raise ValueError("max_batch, max_queue and max_inflight must be >= 1, "
                             "max_wait_ms >= 0")
        self._fn = fn
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self._slots = anyio.Semaphore(max_inflight)
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._arrived = anyio.Event()
        self._tg: TaskGroup | None = None
        self._closed = False
        self.batch_sizes: list[int] = [0] * (max_batch + 1)
        """``batch_sizes[n]``: how many batches had ``n`` requests."""

    @property
    def batches(self) -> int:
        """Batches run so far."""
        return sum(self.batch_sizes)

    @property
    def depth(self) -> int:
        """Requests waiting for a batch."""
        return len(self._waiting)

    async def __aenter__(self) -> Batcher[T, R]:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._gather)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> bool | None:
        assert self._tg is not None
        self._closed = True
        self._tg.cancel_scope.cancel()
        for _, fut in self._waiting:
            if not fut.done():
                fut.set_exception(ShardlineError("the batcher closed"))
        self._waiting.clear()
        return await self._tg.__aexit__(exc_type, exc, tb)

    async def __call__(self, item: T) -> R:
        if self._tg is None or self._closed:
            raise RuntimeError("use the batcher inside 'async with'")
        if len(self._waiting) >= self.max_queue:
            raise QueueFull(f"{len(self._waiting)} requests are already waiting "
                            f"(max_queue={self.max_queue})")
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, fut))
        self._arrived.set()
        try:
            return await fut
        except asyncio.CancelledError:
            # A caller that gives up before its batch starts leaves no work behind.
            self._waiting[:] = [(i, f) for i, f in self._waiting if f is not fut]
            raise

    async def _gather(self) -> None:
        assert self._tg is not None
        while True:
            if not self._waiting:
                self._arrived = anyio.Event()
                await self._arrived.wait()
            await self._slots.acquire()
            deadline = time.monotonic() + self.max_wait
            while len(self._waiting) < self.max_batch:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._arrived = anyio.Event()
                with anyio.move_on_after(left):
                    await self._arrived.wait()
            batch = self._waiting[:self.max_batch]
            del self._waiting[:self.max_batch]
            batch = [(i, f) for i, f in batch if not f.done()]
            if not batch:
                self._slots.release()
                continue
            self._tg.start_soon(self._run, batch)

    async def _run(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            self.batch_sizes[len(batch)] += 1
            try:
                results = await self._fn([item for item, _ in batch])
                if len(results) != len(batch):
                    raise ValueError(f"the batch function returned {len(results)} results "
                                     f"for {len(batch)} requests")
            except Exception as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                return
            for (_, fut), result in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(result)
        finally:
            self._slots.release()

