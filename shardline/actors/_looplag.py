"""How late a node's event loop runs: the lag of a timer due every ``interval`` s.

A synchronous call that holds the loop (tokenizing a huge request, a torch forward not
behind ``to_thread``) shows up as one large sample; nothing else on the node (replies,
heartbeats, timeouts) could run meanwhile.
"""

from __future__ import annotations

import bisect
import time
from collections import deque

import anyio

__all__ = ["BUCKETS", "LoopLag"]

# Histogram bounds in seconds (Prometheus ``le`` labels).
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class LoopLag:
    """Samples the loop's lag; keeps the last ``window`` samples for percentiles and
    a histogram of all of them."""

    def __init__(self, interval: float = 0.1, window: int = 6000) -> None:
        if interval <= 0:
            raise ValueError("interval must be > 0")
        self.interval = interval
        self._recent: deque[float] = deque(maxlen=window)
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0
        self.samples = 0
        self.max = 0.0
        self.last = 0.0

    async def run(self) -> None:
        """Sample forever; owned by the node's task group."""
        interval = self.interval
        while True:
            started = time.monotonic()
            await anyio.sleep(interval)
            self.record(time.monotonic() - started - interval)

    def record(self, lag: float) -> None:
        lag = max(lag, 0.0)
        self._recent.append(lag)
        self.counts[bisect.bisect_left(BUCKETS, lag)] += 1
        self.total += lag
        self.samples += 1
        self.last = lag
        if lag > self.max:
            self.max = lag

    def statistics(self) -> dict[str, float | int]:
        """Seconds: the last sample, p50 / p99 / max of the recent window, the max
        since the node started, and how many samples were taken."""
        recent = sorted(self._recent)
        return {
            "last": self.last,
            "p50": _quantile(recent, 0.50),
            "p99": _quantile(recent, 0.99),
            "recent_max": recent[-1] if recent else 0.0,
            "max": self.max,
            "samples": self.samples,
        }


def _quantile(ordered: list[float], q: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
