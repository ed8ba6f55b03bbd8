"""Helpers shared by the benchmarks: timing, medians, JSON lines."""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any


def emit(**fields: Any) -> None:
    """One JSON object per line on stdout: the format every benchmark prints."""
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


async def per_op_us(op: Callable[[], Awaitable[Any]], n: int, repeats: int = 5) -> float:
    """Median over ``repeats`` of the mean cost of ``op`` in microseconds."""
    for _ in range(min(n, 1000)):  # warm up caches and the allocator
        await op()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            await op()
        samples.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(samples)
