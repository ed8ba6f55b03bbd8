"""The batched calls of continuous batching: the rows of many generate requests through
their replica's stages as one batch (a prefill call or a decode step), each row getting
its own result or its own error.

A call is planned (``plan``: its replica's rows, its step id, where its rows run ahead
from) when the loop takes its rows, and run after: a decode step that runs rows ahead
goes out while the step it goes on from is still in flight. The last stage of each
decode step hands its tokens to the first stage under an id reserved for the step
that goes on from it (``Call.feed_to``), and that step takes the id, so a row run
ahead always finds the token it goes on from. A reserved id no step took leaves one
small tensor behind on the first stage, which its device drops after a while.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import anyio
import torch

from ._batching import Row
from ._errors import PipelineError

if TYPE_CHECKING:
    from ._scheduler import Scheduler

__all__ = ["Call", "fail", "plan", "run_calls"]


class Call:
    """One replica's batch of a prefill call or a decode step."""

    __slots__ = ("after", "failed", "feed_to", "outcome", "prefill", "replica", "rows",
                 "step")

    def __init__(self, replica: int, rows: list[Row], prefill: bool, step: int,
                 feed_to: int | None) -> None:
        self.replica = replica
        self.rows = rows
        self.prefill = prefill
        self.step = step
        self.feed_to = feed_to  # the step id its tokens go to the first stage under
        # The call whose tokens its rows run ahead from: it cannot run without them.
        self.after: Call | None = None
        self.failed = anyio.Event()  # set before the failure is mended
        # Once over: None (it ran), or whether the failure left the pipeline whole.
        self.outcome: asyncio.Future[bool | None] = \
            asyncio.get_running_loop().create_future()


def plan(s: Scheduler, rows: list[Row], prefill: bool) -> list[Call]:
    """The calls of one prefill call or decode step, one per replica, with their step
    ids; rows whose request is gone get their error here."""
    groups: dict[int, list[Row]] = {}
    for row in rows:
        if row.done.done():
            continue  # its caller left meanwhile
        try:
            pin = s._check_pin(row.cache)
        except PipelineError as exc:
            row.fail(exc)
            continue
        if pin is not None:
            groups.setdefault(pin.replica, []).append(row)
        elif prefill:  # a new request: its replica from now on
            groups.setdefault(s._replica_for(row.cache), []).append(row)
        else:
            row.fail(LookupError(f"request {row.cache} was released"))
    calls = []
    for replica, group in groups.items():
        calls += _plan_group(s, replica, group, prefill)
    return calls


def _plan_group(s: Scheduler, replica: int, group: list[Row],
                prefill: bool) -> list[Call]:
    # A step run ahead takes the id its tokens were sent to the first stage under, and
    # depends on the call that sends them while that call runs.
    fed = [row for row in group if row.feed_from is not None]
    step: int | None = None
    after: Call | None = None
    if fed:
        sources = [row.feed_from for row in fed if row.feed_from is not None]
        ids = {source.feed_to for source in sources}
        running = {id(source.call): source.call for source in sources
                   if source.call is not None}
        if len(ids) == 1 and None not in ids and len(running) <= 1 and \
                all(not source.done.done() or source.succeeded() for source in sources):
            (step,) = ids
            after = next(iter(running.values()), None)
            if after is not None and after.replica != replica:
                step = after = None
        if step is None:
            for row in fed:  # never expected: it cannot get the token it goes on from
                _fail_with(s, row, PipelineError(f"request {row.cache} lost its place "
                                                 "in the running batch", 0, replica), True)
            group = [row for row in group if row.feed_from is None]
            if not group:
                return []
    if step is None:
        step = next(s._steps)
    # Tokens for a next step to run ahead from, where one may: greedy rows only (a
    # step that samples cannot run ahead), one of which goes on.
    feed_to = next(s._steps) if not prefill and s._decodes.ahead and \
        all(row.greedy for row in group) and \
        any(row.more or not row.claimed for row in group) else None
    call = Call(replica, group, prefill, step, feed_to)
    call.after = after
    for i, row in enumerate(group):
        row.index, row.call, row.feed_to = i, call, feed_to
    return [call]


async def run_calls(s: Scheduler, calls: list[Call]) -> None:
    """Run the planned calls of one prefill call or decode step (one per replica)."""
    async with anyio.create_task_group() as tg:
        for call in calls:
            tg.start_soon(_run, s, call)


async def _run(s: Scheduler, call: Call) -> None:
    try:
        await _batched_group(s, call)
    except BaseException:
        call.failed.set()  # whatever stopped it, what goes on from it cannot run
        raise
    finally:
        if not call.outcome.done():
            call.outcome.set_result(None)
        call.after = None
        for row in call.rows:
            row.forget()


async def _batched_group(s: Scheduler, call: Call) -> None:
    rows, prefill = call.rows, call.prefill
    width = max(row.take for row in rows)
    # one tensor from lists: a copy per row costs a tenth of a millisecond a step
    x = torch.tensor([(row.chunk if row.feed_from is None else [0])
                      + [0] * (width - row.take) for row in rows], dtype=torch.int64)
    lengths = [row.take for row in rows] if prefill else None
    feed = [-1 if row.feed_from is None else row.feed_from.index for row in rows] \
        if any(row.feed_from is not None for row in rows) else None
    failure: PipelineError | None = None
    with anyio.CancelScope() as scope:
        if call.after is not None:
            async with anyio.create_task_group() as tg:
                # Without the step it goes on from, its first stage would wait forever.
                tg.start_soon(_cancel_when_failed, call.after, scope)
                failure = await _infer(s, call, x, lengths, feed)
                tg.cancel_scope.cancel()
        else:
            failure = await _infer(s, call, x, lengths, feed)
        if failure is None:
            return
    call.failed.set()
    if scope.cancelled_caught:  # the step it went on from failed: so does this one
        assert call.after is not None
        source = await call.after.outcome
        error = PipelineError("the decode step this one went on from failed", 0,
                              call.replica)
        for row in rows:
            # A row of its own (not run ahead) may have been half through the stages:
            # its request is replayed.
            _fail_with(s, row, error, bool(source) or row.feed_from is None)
        call.outcome.set_result(bool(source))
        return
    assert failure is not None
    if failure.recovered:  # nothing ran: the pipeline changed under the step
        recovered = True
    else:
        try:
            await s._mend(failure, 1)
        except PipelineError:
            recovered = False  # not a lost node: a stage raised for the whole batch
        else:
            recovered = True
    call.outcome.set_result(recovered)
    for row in rows:
        _fail_with(s, row, failure, recovered)


async def _infer(s: Scheduler, call: Call, x: torch.Tensor, lengths: list[int] | None,
                 feed: list[int] | None) -> PipelineError | None:
    """The call through its replica: hands every row its result (or its own error);
    returns the failure of the whole call."""
    rows = call.rows
    async with s._gate.hold(exclusive=False):
        if feed is not None:
            try:  # a stage replaced since its tokens were sent (a heal): none will come
                for row in rows:
                    s._check_pin(row.cache)
            except PipelineError as exc:
                return exc
        try:
            out, errors = await s._infer(x, [row.cache for row in rows], call.replica,
                                         [row.greedy for row in rows], lengths,
                                         step=call.step, feed=feed, feed_to=call.feed_to)
        except PipelineError as exc:
            return exc
    counts = s.batched["prefill" if call.prefill else "decode"]
    counts["calls"] += 1
    counts["rows"] += len(rows)
    counts["max_rows"] = max(counts["max_rows"], len(rows))
    counts["ahead_rows"] += 0 if feed is None else sum(f >= 0 for f in feed)
    tokens = out["tokens"].tolist()
    logits = iter(out["logits"])
    for i, row in enumerate(rows):
        result = tokens[i] if row.greedy else next(logits)
        if row.done.done():
            continue
        if i in errors:
            row.fail(errors[i])
        elif row.offset + row.take == len(row.tokens) or row.feed_from is not None:
            row.done.set_result(result)  # else: more of its prompt to come
    return None


async def _cancel_when_failed(source: Call, scope: anyio.CancelScope) -> None:
    await source.failed.wait()
    scope.cancel()


def _fail_with(s: Scheduler, row: Row, failure: PipelineError, recovered: bool) -> None:
    error = PipelineError(str(failure), failure.stage, failure.replica)
    error.__cause__ = failure.__cause__
    if recovered:
        error.recovered = True
        s._unpin(row.cache)
    row.fail(error)


def fail(rows: list[Row], error: BaseException) -> None:
    """Every row still waiting gets ``error``."""
    for row in rows:
        row.fail(error)
