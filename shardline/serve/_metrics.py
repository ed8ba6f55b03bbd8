"""Prometheus metrics of a model server, in its own registry."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import anyio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .._errors import ShardlineError
from ..models import Pipeline

__all__ = ["ServeMetrics"]


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("shardline_requests", "HTTP requests answered",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("shardline_request_seconds", "Time to answer a request",
                                 ["endpoint"], registry=self.registry,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.batch_size = Histogram("shardline_batch_size", "Requests per pipeline call",
                                    registry=self.registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.queue_depth = Gauge("shardline_queue_depth", "Requests waiting for a batch",
                                 registry=self.registry)
        self.stage_busy = Gauge("shardline_stage_busy_seconds",
                                "Compute time spent by each pipeline device",
                                ["device"], registry=self.registry)
        self.tokens = Counter("shardline_completion_tokens", "Tokens generated",
                              registry=self.registry)
        self.loop_lag = Histogram(
            "shardline_serve_loop_lag_seconds",
            "How late the event loop woke a task that asked to sleep: time the loop was "
            "busy with something else", registry=self.registry,
            buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.connections_closed = Counter(
            "shardline_serve_connections_closed",
            "HTTP connections the server closed on a limit", ["reason"],
            registry=self.registry)
        self.recoveries = Counter(
            "shardline_recoveries",
            "Recoveries: what='worker', a lost worker process restarted; what='stage', "
            "the pipeline stages it held rebuilt on a worker", ["what"],
            registry=self.registry)
        for what in ("worker", "stage"):
            self.recoveries.labels(what)  # shown at 0 before the first
        self._pipe: Pipeline | None = None

    def watch(self, queue: Any, pipe: Pipeline) -> None:
        """``queue.depth``: requests waiting (or running, for completions)."""
        self.queue_depth.set_function(lambda: float(queue.depth))
        self._pipe = pipe

    async def measure_loop_lag(self, interval: float = 0.1) -> None:
        """Until cancelled: sleep ``interval`` seconds, again and again, and observe how
        much later than asked the loop woke this task."""
        while True:
            asked = time.monotonic()
            await anyio.sleep(interval)
            self.loop_lag.observe(max(0.0, time.monotonic() - asked - interval))

    async def render(self, timeout: float = 1.0) -> bytes:
        """The text exposition; per-device busy time is asked of the stages now (a stage
        that does not answer within ``timeout`` keeps its last value). With replicas, a
        copy's devices are labelled ``"R:D"`` (replica, device)."""
        pipe = self._pipe
        if pipe is not None:
            for r in range(pipe.replicas):
                try:
                    refs = pipe.replica_devices(r)
                except KeyError:  # a copy being rebuilt: its stages are not all there
                    continue
                for d, ref in enumerate(refs):
                    label = str(d) if pipe.replicas == 1 else f"{r}:{d}"
                    with contextlib.suppress(ShardlineError, TimeoutError), \
                            anyio.move_on_after(timeout):
                        stats = await ref.ask("stats", timeout=timeout)
                        self.stage_busy.labels(device=label).set(stats["busy_seconds"])
        return generate_latest(self.registry)
