"""Continuous batching: which ``generate`` requests the next decode step runs.

A running request asks for its next token's logits (``submit``) once it has sampled the
one before. One decode loop per pipeline takes every row waiting (``next_rows``), runs
them through the stages as one batch, one pipeline call for all of them, and hands
each request its row (``DecodeRow.done``). Requests join whenever their prompt has been
through the pipeline (the prefill, a call of its own) and leave whenever they stop
(finished, closed, cancelled): always between steps.

After a step the loop waits a moment (``join_wait_s``) for that step's rows to come
back: a request whose consumer keeps pulling is back within a fraction of a
millisecond, and waiting for it keeps the batch whole instead of splitting it into the
first row back and the rest. A row whose consumer is slower misses a step and joins
the next one; the loop never waits for it twice. With nothing waiting and nothing
expected back, the loop ends (``running`` turns false); the next ``submit`` starts it
again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

__all__ = ["DecodeBatcher", "DecodeRow"]


class DecodeRow:
    """One request's place in a decode step: its newest token, and where its logits go."""

    __slots__ = ("cache", "done", "token")

    def __init__(self, cache: str, token: int, done: asyncio.Future[Any]) -> None:
        self.cache = cache
        self.token = token
        self.done = done


class DecodeBatcher:
    """The rows waiting for the next decode step. ``start`` is called (and awaited) when
    a row arrives and no loop is running; the loop then calls ``next_rows`` until it
    returns no rows, and ``finished`` after each step."""

    def __init__(self, start: Callable[[], Awaitable[None]], max_rows: int = 64,
                 join_wait_s: float = 0.002) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.max_rows = max_rows
        self.join_wait_s = join_wait_s
        self.running = False
        self._start = start
        self._pending: dict[str, DecodeRow] = {}  # in arrival order
        self._expected: set[str] = set()          # rows of the last step, not back yet
        self._changed = anyio.Event()

    @property
    def waiting(self) -> int:
        return len(self._pending)

    async def submit(self, cache: str, token: int) -> Any:
        """Wait for the step that runs ``token`` as request ``cache``'s next row; returns
        what the loop hands this row (or raises its error)."""
        if cache in self._pending:
            raise ValueError(f"request {cache} is already waiting for a decode step")
        row = DecodeRow(cache, token, asyncio.get_running_loop().create_future())
        self._pending[cache] = row
        self._changed.set()
        try:
            if not self.running:
                self.running = True
                try:
                    await self._start()
                except BaseException:
                    self.running = False
                    raise
            return await row.done
        finally:
            if self._pending.get(cache) is row:
                del self._pending[cache]  # it left before a step took it

    def leave(self, cache: str) -> None:
        """Request ``cache`` stopped: nobody waits for it any more."""
        row = self._pending.pop(cache, None)
        if row is not None and not row.done.done():
            row.done.set_exception(LookupError(f"request {cache} was released"))
        self._expected.discard(cache)
        self._changed.set()

    async def next_rows(self) -> list[DecodeRow]:
        """The rows of the next step (at most ``max_rows``, oldest first), once the rows
        of the last step are back or ``join_wait_s`` has passed. An empty list means
        there is nothing left to run: the loop must end (``running`` is false already,
        so the next ``submit`` starts a new one)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.join_wait_s
        while True:
            self._changed = anyio.Event()
            if self._pending and self._expected <= self._pending.keys():
                break
            if not self._pending and not self._expected:
                self.running = False
                return []
            left = deadline - loop.time()
            if left <= 0:
                self._expected.clear()  # the stragglers join a later step
                continue
            with anyio.move_on_after(left):
                await self._changed.wait()
        self._expected.clear()
        rows = []
        for cache in list(self._pending)[:self.max_rows]:
            rows.append(self._pending.pop(cache))
        return rows

    def finished(self, rows: list[DecodeRow]) -> None:
        """A step ended: the rows it served will likely be back for the next one."""
        self._expected.update(r.cache for r in rows
                              if r.done.done() and not r.done.cancelled()
                              and r.done.exception() is None)

    def fail_all(self, error: BaseException) -> None:
        """The loop stopped for good (the pipeline is stopping): nobody will run these."""
        for row in self._pending.values():
            if not row.done.done():
                row.done.set_exception(error)
        self._pending.clear()
        self._expected.clear()
        self.running = False
