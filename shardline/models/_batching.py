"""Continuous batching: which ``generate`` requests each batched pipeline call runs.

Two queues feed a pipeline's inference, each drained by a loop of its own that the
scheduler runs while requests wait (and that ends when none do):

``PrefillQueue``: new prompts. One call runs the prompts waiting, each row with its own
number of tokens (right-padded), at most ``chunk`` tokens per prompt and ``budget``
padded tokens per call; a longer prompt goes on in the next call. One prefill call is
in flight at a time, between decode steps: a burst of long prompts never holds up the
running requests for more than one call.

``DecodeBatcher``: running requests. Each asks for its next token's logits once it has
sampled the one before; one decode step runs every row waiting as one batch ``[rows,
1]``, one pipeline call for all of them. Requests join whenever their prefill is done
and leave whenever they stop (finished, closed, cancelled): always between steps.
After a step the loop waits a moment (``join_wait_s``) for that step's rows to come
back: a request whose consumer keeps pulling is back within a fraction of a
millisecond, and waiting for it keeps the batch whole instead of splitting it into the
first row back and the rest. A row whose consumer is slower misses a step and joins
the next one; the loop never waits for it twice. Up to ``groups`` steps may be in
flight at once, each with its share of the rows.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

__all__ = ["DecodeBatcher", "PrefillQueue", "Row"]


class Row:
    """One request's place in a batched call: its tokens still to go through the
    pipeline, whether it only needs the argmax of its logits, and where the result
    goes."""

    __slots__ = ("cache", "done", "greedy", "offset", "take", "tokens")

    def __init__(self, cache: str, tokens: list[int], greedy: bool,
                 done: asyncio.Future[Any]) -> None:
        self.cache = cache
        self.tokens = tokens
        self.greedy = greedy
        self.done = done
        self.offset = 0  # tokens already through the pipeline
        self.take = 0    # tokens in the call it is in now

    @property
    def chunk(self) -> list[int]:
        return self.tokens[self.offset:self.offset + self.take]


class _Queue:
    """Rows waiting for a call. ``start`` is called (and awaited) when a row arrives and
    no loop is running; the loop then calls ``next_rows`` until it returns none."""

    what = "call"

    def __init__(self, start: Callable[[], Awaitable[None]], max_rows: int) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.max_rows = max_rows
        self.running = False
        self._start = start
        self._pending: dict[str, Row] = {}  # in arrival order
        self._changed = anyio.Event()

    @property
    def waiting(self) -> int:
        """Requests waiting for a call."""
        return len(self._pending)

    async def submit(self, cache: str, tokens: list[int], greedy: bool = False) -> Any:
        """Wait for the call(s) that run ``tokens`` as request ``cache``'s next rows;
        returns what the loop hands this row (or raises its error)."""
        if cache in self._pending:
            raise ValueError(f"request {cache} is already waiting for a {self.what}")
        row = Row(cache, tokens, greedy, asyncio.get_running_loop().create_future())
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
                del self._pending[cache]  # it left before a call took it

    def leave(self, cache: str) -> None:
        """Request ``cache`` stopped: nobody waits for it any more."""
        row = self._pending.pop(cache, None)
        if row is not None and not row.done.done():
            row.done.set_exception(LookupError(f"request {cache} was released"))
        self._changed.set()

    def fail_all(self, error: BaseException) -> None:
        """The loop stopped for good (the pipeline is stopping): nobody will run these."""
        for row in self._pending.values():
            if not row.done.done():
                row.done.set_exception(error)
        self._pending.clear()
        self.running = False

    def _idle(self) -> list[Row]:
        self.running = False  # from here, the next submit starts a new loop
        return []


class PrefillQueue(_Queue):
    """New prompts: each call takes the oldest waiting, up to ``chunk`` tokens of each and
    ``budget`` tokens in all (rows x the longest of them: padding costs too)."""

    what = "prefill"

    def __init__(self, start: Callable[[], Awaitable[None]], max_rows: int = 64,
                 chunk: int = 128, budget: int = 1024) -> None:
        super().__init__(start, max_rows)
        if chunk < 1 or budget < chunk:
            raise ValueError(f"need 1 <= chunk <= budget, got {chunk}, {budget}")
        self.chunk = chunk
        self.budget = budget

    async def next_rows(self) -> list[Row]:
        """The rows of the next prefill call (``row.take``: its tokens in this call); an
        empty list: nothing is left, the loop must end."""
        if not self._pending:
            return self._idle()
        rows: list[Row] = []
        longest = 0
        for row in self._pending.values():
            take = min(self.chunk, len(row.tokens) - row.offset)
            wider = max(longest, take)
            if rows and (wider * (len(rows) + 1) > self.budget or
                         len(rows) == self.max_rows):
                break
            row.take, longest = take, wider
            rows.append(row)
        for row in rows:
            del self._pending[row.cache]
        return rows

    def finished(self, rows: list[Row]) -> None:
        """A call ended: rows with tokens left go on first in the next one."""
        rest = {}
        for row in rows:
            row.offset += row.take
            if row.offset < len(row.tokens) and not row.done.done():
                rest[row.cache] = row
        if rest:
            self._pending = {**rest, **self._pending}
            self._changed.set()


class DecodeBatcher(_Queue):
    """Running requests, one new token each per step."""

    what = "decode step"

    def __init__(self, start: Callable[[], Awaitable[None]], max_rows: int = 64,
                 join_wait_s: float = 0.002, groups: int = 1) -> None:
        super().__init__(start, max_rows)
        if groups < 1:
            raise ValueError(f"groups must be >= 1, got {groups}")
        self.join_wait_s = join_wait_s
        self.groups = groups
        self._expected: set[str] = set()  # rows of finished steps, not back yet
        self._steps = 0                   # steps in flight
        self._flying = 0                  # rows in them

    def leave(self, cache: str) -> None:
        self._expected.discard(cache)
        super().leave(cache)

    async def next_rows(self) -> list[Row]:
        """The rows of the next step, once fewer than ``groups`` steps are in flight and
        the rows of the finished ones are back (or ``join_wait_s`` has passed): the
        oldest waiting, up to an even share of the running requests per group and
        ``max_rows``. An empty list means there is nothing left to run: the loop must
        end (the next ``submit`` starts a new one)."""
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        while True:
            self._changed = anyio.Event()
            if self._steps >= self.groups:
                await self._changed.wait()  # a step finishes
                continue
            if self._pending and self._expected <= self._pending.keys():
                break
            if not self._pending and not self._expected:
                if not self._flying:
                    return self._idle()
                await self._changed.wait()
                continue
            if deadline is None:
                deadline = loop.time() + self.join_wait_s
            left = deadline - loop.time()
            if left <= 0:
                self._expected.clear()  # the stragglers join a later step
                continue
            with anyio.move_on_after(left):
                await self._changed.wait()
        self._expected.clear()
        running = len(self._pending) + self._flying
        share = min(self.max_rows, -(-running // self.groups))
        rows = [self._pending.pop(cache) for cache in list(self._pending)[:share]]
        for row in rows:
            row.take = 1
        self._steps += 1
        self._flying += len(rows)
        return rows

    def finished(self, rows: list[Row]) -> None:
        """A step ended: the rows it served will likely be back for the next one."""
        self._steps -= 1
        self._flying -= len(rows)
        self._expected.update(r.cache for r in rows
                              if r.done.done() and not r.done.cancelled()
                              and r.done.exception() is None)
        self._changed.set()

    def fail_all(self, error: BaseException) -> None:
        super().fail_all(error)
        self._expected.clear()
        self._steps = self._flying = 0
