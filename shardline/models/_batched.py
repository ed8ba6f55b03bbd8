"""The batched calls of continuous batching: the rows of many generate requests through
their replica's stages as one batch (a prefill call or a decode step), each row getting
its own result or its own error."""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio
import torch

from ._batching import Row
from ._errors import PipelineError

if TYPE_CHECKING:
    from ._scheduler import Scheduler

__all__ = ["batched_call", "fail"]


async def batched_call(s: Scheduler, rows: list[Row], prefill: bool) -> None:
    """One prefill call or decode step: the rows of each replica as one batch through
    that replica's stages; each row gets its result or its own error."""
    groups: dict[int, list[Row]] = {}
    for row in rows:
        if row.done.done():
            continue  # its caller left meanwhile
        try:
            pin = s._check_pin(row.cache)
        except PipelineError as exc:
            row.done.set_exception(exc)
            continue
        if pin is not None:
            groups.setdefault(pin.replica, []).append(row)
        elif prefill:  # a new request: its replica from now on
            groups.setdefault(s._replica_for(row.cache), []).append(row)
        else:
            row.done.set_exception(LookupError(f"request {row.cache} was released"))
    async with anyio.create_task_group() as tg:
        for replica, group in groups.items():
            tg.start_soon(_batched_group, s, replica, group, prefill)


async def _batched_group(s: Scheduler, replica: int, rows: list[Row],
                         prefill: bool) -> None:
    width = max(row.take for row in rows)
    # one tensor from lists: a copy per row costs a tenth of a millisecond a step
    x = torch.tensor([row.chunk + [0] * (width - row.take) for row in rows],
                     dtype=torch.int64)
    lengths = [row.take for row in rows] if prefill else None
    async with s._gate.hold(exclusive=False):
        try:
            out, errors = await s._infer(x, [row.cache for row in rows], replica,
                                            [row.greedy for row in rows], lengths)
        except PipelineError as exc:
            failure = exc
        else:
            counts = s.batched["prefill" if prefill else "decode"]
            counts["calls"] += 1
            counts["rows"] += len(rows)
            counts["max_rows"] = max(counts["max_rows"], len(rows))
            tokens = out["tokens"].tolist()
            logits = iter(out["logits"])
            for i, row in enumerate(rows):
                result = tokens[i] if row.greedy else next(logits)
                if row.done.done():
                    continue
                if i in errors:
                    row.done.set_exception(errors[i])
                elif row.offset + row.take == len(row.tokens):  # else: more to come
                    row.done.set_result(result)
            return
    try:
        await s._mend(failure, 1)
    except PipelineError:
        recovered = False  # not a lost node: a stage raised for the whole batch
    else:
        recovered = True
    for row in rows:
        error = PipelineError(str(failure), failure.stage, failure.replica)
        error.__cause__ = failure.__cause__
        if recovered:
            error.recovered = True
            s._unpin(row.cache)
        if not row.done.done():
            row.done.set_exception(error)


def fail(rows: list[Row], error: BaseException) -> None:
    """Every row still waiting gets ``error``."""
    for row in rows:
        if not row.done.done():
            row.done.set_exception(error)

