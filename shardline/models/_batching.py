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
the next one; the loop never waits for it twice.

Running ahead (``ahead``, the default): a greedy request's next input is the argmax its
step is computing right now, so the next step need not wait for it to come back
through the scheduler and its caller. While a step is in flight, the next one is
already sent with those rows (``Row.feed_from``): the last stage hands its tokens
straight to the first (``StageActor.run``'s ``feed``), and a decode step costs the
stages' compute and two links, not also the hops to the scheduler and the caller's
turn. A row runs at most one step ahead of its caller (only a row whose caller waits
for the step before, and said it will ask again, goes on), so a slow consumer holds
back its own request only; a request that stops (its end of sequence) wastes that one
row of one step. Otherwise up to ``groups`` steps may be in flight at once, each with
its share of the rows.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

__all__ = ["DecodeBatcher", "Diverged", "PrefillQueue", "Row"]


def _ok(done: asyncio.Future[Any]) -> bool:
    return done.done() and not done.cancelled() and done.exception() is None


class Diverged(ValueError):
    """A request asked to go on from another token than the one its step run ahead
    took: its state on the stages holds that step's token, so it cannot go on."""


class Row:
    """One request's place in a batched call: its tokens still to go through the
    pipeline, whether it only needs the argmax of its logits, and where the result
    goes."""

    __slots__ = ("cache", "call", "chain", "claimed", "done", "feed_from", "feed_to",
                 "greedy", "index", "more", "offset", "source", "successor", "take",
                 "tokens")

    def __init__(self, cache: str, tokens: list[int], greedy: bool,
                 done: asyncio.Future[Any], more: bool = False,
                 feed_from: Row | None = None) -> None:
        self.cache = cache
        self.tokens = tokens
        self.greedy = greedy
        self.done = done
        self.offset = 0  # tokens already through the pipeline
        self.take = 0    # tokens in the call it is in now
        self.more = more  # its caller will ask for the token after this one
        # Run ahead: its input is that row's argmax, handed over by the stages. The
        # links between rows and calls go once a call is over (``forget``): a running
        # batch would otherwise keep every row and call it ever made.
        self.feed_from = feed_from
        # ... whose result is this future's: what a claim must go on from.
        self.source = feed_from.done if feed_from is not None else None
        self.claimed = feed_from is None  # a caller waits for its result
        self.successor: Row | None = None  # the row run ahead from this one
        self.index = -1    # its place in its replica's batch of the call
        self.feed_to: int | None = None  # the step id its call sent its tokens under
        self.call: Any = None  # that batch (``_batched.Call``), while it runs
        self.chain: Any = None  # the requests it goes from step to step with

    def succeeded(self) -> bool:
        """Its result is in, and is not an error."""
        return _ok(self.done)

    def forget(self) -> None:
        """Its call is over: drop the links to the rows and calls before it."""
        self.feed_from = None
        self.call = None

    def fail(self, error: BaseException) -> None:
        """Hand ``error`` to the caller, if it has not gone; a row run ahead that no
        caller claimed keeps it for a late claim without logging it as lost."""
        if not self.done.done():
            self.done.set_exception(error)
            if not self.claimed:
                self.done.exception()  # retrieved: nobody may ever claim it

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

    async def submit(self, cache: str, tokens: list[int], greedy: bool = False,
                     more: bool = False) -> Any:
        """Wait for the call(s) that run ``tokens`` as request ``cache``'s next rows;
        returns what the loop hands this row (or raises its error). ``more``: the
        caller will ask for the token after this one (unless it is a stop token)."""
        if cache in self._pending:
            raise ValueError(f"request {cache} is already waiting for a {self.what}")
        row = Row(cache, tokens, greedy, asyncio.get_running_loop().create_future(), more)
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


class _Chain:
    """Requests that go from decode step to decode step together: the rows of its
    newest step, its steps in flight (two while the newest runs ahead of the one
    before), and the rows of its finished steps that are to come back by themselves."""

    __slots__ = ("expected", "finished_at", "flying", "last")

    def __init__(self) -> None:
        self.last: list[Row] = []
        self.flying = 0
        self.expected: set[str] = set()
        self.finished_at = 0.0


class DecodeBatcher(_Queue):
    """Running requests, one new token each per step."""

    what = "decode step"

    def __init__(self, start: Callable[[], Awaitable[None]], max_rows: int = 64,
                 join_wait_s: float = 0.002, groups: int = 1, ahead: bool = True,
                 min_rows: int = 8) -> None:
        super().__init__(start, max_rows)
        if groups < 1 or min_rows < 1:
            raise ValueError(f"groups and min_rows must be >= 1, got {groups}, {min_rows}")
        self.join_wait_s = join_wait_s
        self.groups = groups
        self.ahead = ahead
        self.min_rows = min_rows
        self._chains: list[_Chain] = []
        self._ahead: dict[str, Row] = {}  # rows run ahead that no caller claimed yet
        self._turn = 0                    # the chain the next pass looks at first

    async def submit(self, cache: str, tokens: list[int], greedy: bool = False,
                     more: bool = True) -> Any:
        row = self._ahead.pop(cache, None)
        if row is None:
            return await super().submit(cache, tokens, greedy, more)
        source = row.source
        assert source is not None
        if len(tokens) != 1 or not greedy or not _ok(source) or \
                source.result() != tokens[0]:
            raise Diverged(f"request {cache} went on from token {tokens} where its "
                           "next step, already run, went on from its argmax")
        row.claimed, row.more = True, more
        self._changed.set()
        return await row.done

    def leave(self, cache: str) -> None:
        self._ahead.pop(cache, None)
        for chain in self._chains:
            chain.expected.discard(cache)
            for row in chain.last:
                if row.cache == cache:
                    row.more = False  # nothing runs ahead of it any more
        super().leave(cache)

    def _continuing(self, chain: _Chain) -> list[Row]:
        """Rows of the chain's newest step its next one can run ahead: greedy, claimed
        by a caller who will ask again, not run ahead already, not failed. None where a
        row samples: it cannot run ahead, and a step without it would leave it every
        other step, at half the pace of the waits it would save the others."""
        if not self.ahead or any(not row.greedy for row in chain.last):
            return []
        return [row for row in chain.last
                if row.more and row.claimed and row.successor is None
                and row.cache not in self._pending
                and (not row.done.done() or row.succeeded())]

    def _returning(self, chain: _Chain) -> bool:
        """Whether rows of the chain's newest step are on their way back: run ahead,
        the step before done, no claim from their caller yet, not released."""
        return any(not row.claimed and row.source is not None and _ok(row.source)
                   and self._ahead.get(row.cache) is row for row in chain.last)

    async def next_rows(self) -> list[Row]:
        """The rows of the next step, in a chain of requests that go from step to step
        together (up to ``groups`` chains of ``min_rows`` rows or more, each with one
        step in flight, or two where the newer runs ahead), once the rows of the
        chain's finished step are back (or ``join_wait_s`` has passed): the rows run
        ahead, the chain's own, and the oldest waiting, up to an even share of the
        running requests per chain and ``max_rows``. An empty list means there is
        nothing left to run: the loop must end (the next ``submit`` starts a new
        one)."""
        loop = asyncio.get_running_loop()
        while True:
            self._changed = anyio.Event()
            now = loop.time()
            self._chains = [c for c in self._chains
                            if c.flying or c.expected or self._continuing(c)]
            if self._pending and len(self._chains) < self._target():
                chain = _Chain()
                self._chains.append(chain)
                return self._take(chain, [])
            if not self._chains and not self._pending:
                return self._idle()
            deadline: float | None = None
            gave_up = False
            n = len(self._chains)
            for k in range(n):
                chain = self._chains[(self._turn + k) % n]
                going_on = self._continuing(chain)
                if chain.flying >= 1 + bool(going_on):
                    continue  # its step is in flight, and it cannot run ahead
                back = chain.expected <= self._pending.keys() and \
                    not self._returning(chain)
                # While its newest step is in flight, waiting for the rows run ahead of
                # it to be claimed costs nothing: the next step could not start sooner.
                due = chain.finished_at + self.join_wait_s if not chain.flying else math.inf
                if not back and now < due:
                    if due < math.inf:
                        deadline = due if deadline is None else min(deadline, due)
                    continue
                if not going_on and not self._pending:
                    chain.expected.clear()  # the stragglers join a later step
                    gave_up = True
                    continue
                self._turn = (self._turn + k + 1) % n
                return self._take(chain, going_on)
            if gave_up:
                continue
            if deadline is None:
                await self._changed.wait()
            else:
                with anyio.move_on_after(deadline - now):
                    await self._changed.wait()

    def _running(self) -> int:
        """Requests in the chains and waiting to join one."""
        return len(self._pending) + sum(len(c.last) for c in self._chains)

    def _target(self) -> int:
        """How many chains the running requests make."""
        return min(self.groups, max(1, self._running() // self.min_rows))

    def _take(self, chain: _Chain, going_on: list[Row]) -> list[Row]:
        """The chain's next step: its rows run ahead, then its own that came back, then
        the oldest waiting, up to its share."""
        running = self._running()
        chains = max(len(self._chains), self._target())
        share = min(self.max_rows, -(-running // chains))
        # Requests waiting to join get up to half the step, as they did when every
        # request queued again after each step: a full batch that runs ahead must not
        # keep the others out until one of its requests ends.
        room = share - min(len(self._pending), share // 2)
        rows: list[Row] = []
        for source in going_on[:max(room, 1)]:
            row = Row(source.cache, [], True, asyncio.get_running_loop().create_future(),
                      feed_from=source)
            source.successor = self._ahead[source.cache] = row
            rows.append(row)
        own = [c for c in self._pending if c in chain.expected]
        others = [c for c in self._pending if c not in chain.expected]
        rows += [self._pending.pop(c) for c in (own + others)[:max(0, share - len(rows))]]
        for row in rows:
            row.take = 1
            row.chain = chain
        chain.expected.clear()
        chain.last = rows
        chain.flying += 1
        return rows

    def finished(self, rows: list[Row]) -> None:
        """A step ended: the rows it served will likely be back for the next one (those
        run ahead by claiming that step, the others by asking again)."""
        if rows:
            chain: _Chain = rows[0].chain
            chain.flying -= 1
            chain.finished_at = asyncio.get_running_loop().time()
            chain.expected.update(r.cache for r in rows if r.claimed and r.more
                                  and r.successor is None and r.succeeded())
        self._changed.set()

    def fail_all(self, error: BaseException) -> None:
        super().fail_all(error)
        for row in self._ahead.values():
            row.fail(error)
        self._ahead.clear()
        self._chains = []
