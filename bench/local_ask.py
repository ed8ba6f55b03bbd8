"""In-process ask round trip vs a bare asyncio queue + future, in the same run.

    python -m bench.local_ask [--n 20000] [--no-uvloop]

Prints JSON lines: the baseline, shardline's sequential ask, and throughput with 100
asks in flight, each with its ratio to the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

import shardline as sl
from bench._common import emit, per_op_us


class Echo(sl.Actor):
    async def echo(self, x: int) -> int:
        return x


async def in_flight_rate(op: Callable[[], Awaitable[Any]], n: int, width: int = 100) -> float:
    """Calls per second with ``width`` callers each looping ``op``: ``width`` in flight."""
    per_caller = max(1, n // width)

    async def caller() -> None:
        for _ in range(per_caller):
            await op()

    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(width):
            tg.start_soon(caller)
    return per_caller * width / (time.perf_counter() - t0)


async def bare_asyncio(n: int) -> tuple[float, float]:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[asyncio.Future[Any], int]] = asyncio.Queue()

    async def consumer() -> None:
        while True:
            fut, x = await queue.get()
            fut.set_result(x)

    task = asyncio.ensure_future(consumer())

    async def op() -> None:
        fut = loop.create_future()
        queue.put_nowait((fut, 1))
        await fut

    try:
        return await per_op_us(op, n), await in_flight_rate(op, n)
    finally:
        task.cancel()


async def shardline_ask(n: int) -> tuple[float, float]:
    async with sl.Node() as node:
        ref = await node.spawn(Echo)
        echo = ref.echo
        return await per_op_us(lambda: echo(1), n), await in_flight_rate(lambda: echo(1), n)


async def main(n: int) -> None:
    base, base_rate = await bare_asyncio(n)
    seq, rate = await shardline_ask(n)
    emit(bench="local_ask", metric="baseline_asyncio_queue_rtt_us", value=round(base, 2))
    emit(bench="local_ask", metric="shardline_ask_rtt_us", value=round(seq, 2),
         baseline_us=round(base, 2), ratio=round(seq / base, 3))
    emit(bench="local_ask", metric="shardline_ask_100_in_flight_per_s", value=round(rate),
         baseline_per_s=round(base_rate), ratio=round(rate / base_rate, 3))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--no-uvloop", action="store_true")
    opts = parser.parse_args()
    sl.run(main(opts.n), use_uvloop=not opts.no_uvloop)
