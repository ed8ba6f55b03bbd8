"""The order of a pipeline's calls: training steps alone and in call order, inference
calls together between them."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator

__all__ = ["StepGate"]


class StepGate:
    """Training steps hold the pipeline alone, in the order they asked; inference calls
    share it between steps. First come, first served: a waiting step holds back the
    inference calls that arrive after it, so a stream of them cannot starve it."""

    def __init__(self) -> None:
        self._readers = 0
        self._writer = False
        self._queue: deque[tuple[bool, asyncio.Future[None]]] = deque()

    @contextlib.asynccontextmanager
    async def hold(self, exclusive: bool) -> AsyncIterator[None]:
        await self._acquire(exclusive)
        try:
            yield
        finally:
            self._release(exclusive)

    def _free(self, exclusive: bool) -> bool:
        return not self._writer and (not exclusive or self._readers == 0)

    def _take(self, exclusive: bool) -> None:
        if exclusive:
            self._writer = True
        else:
            self._readers += 1

    async def _acquire(self, exclusive: bool) -> None:
        if not self._queue and self._free(exclusive):
            self._take(exclusive)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((exclusive, fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._release(exclusive)  # granted just as the caller gave up
            else:
                fut.cancel()
                self._wake()
            raise

    def _release(self, exclusive: bool) -> None:
        if exclusive:
            self._writer = False
        else:
            self._readers -= 1
        self._wake()

    def _wake(self) -> None:
        while self._queue:
            exclusive, fut = self._queue[0]
            if fut.done():
                self._queue.popleft()
                continue
            if not self._free(exclusive):
                return
            self._queue.popleft()
            self._take(exclusive)
            fut.set_result(None)
