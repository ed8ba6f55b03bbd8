"""How the server lives through the loss of a worker: it notices, the cluster restarts
the worker, the pipeline rebuilds the stages it held there, and the server knows when
the model is whole again; every recovery is logged, counted and kept as a trace span.

The pipeline heals itself when a call of it fails (``Pipeline.start(..., spares=
cluster)``); this module makes sure such a call comes at once, from a task of its own
that nothing cancels half way, rather than from whichever request or health check
happens by next.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import anyio
from anyio.abc import TaskGroup

from .. import LocalCluster, RemoteNode
from .._errors import ShardlineError
from ..actors._supervise import WorkerExit
from ..models import Pipeline
from ._metrics import ServeMetrics

__all__ = ["Recovery", "Span"]

log = logging.getLogger("shardline.serve")


@dataclass(frozen=True)
class Span:
    """One recovery, for the trace: ``name`` from ``start`` to ``end`` (epoch seconds)."""

    name: str
    what: str
    """"worker" (a worker process restarted) or "stage" (pipeline stages rebuilt)."""
    start: float
    end: float
    args: dict[str, Any] = field(default_factory=dict)


class _Probe:
    def __init__(self) -> None:
        self.started = time.monotonic()
        self.done = anyio.Event()
        self.error: BaseException | None = None


class Recovery:
    """Watches ``cluster``'s workers and ``pipe``'s recoveries for one model.

    ``refusing()`` is true while a lost worker's stages are being rebuilt and the model
    has no other copy (requests are answered 503 with ``Retry-After: retry_after()``);
    ``check(timeout)`` is the health check: one call through every stage, shared by
    whoever asks meanwhile, excused when it is only slow because the pipeline is busy
    (``progress(since)`` says a real call that entered after it began got through).
    """

    def __init__(self, name: str, pipe: Pipeline, metrics: ServeMetrics,
                 probe: Callable[[], Awaitable[None]], *, cluster: LocalCluster | None = None,
                 poll: float = 0.2, restart_timeout: float = 120.0,
                 call_timeout: float = 300.0) -> None:
        self.name = name
        self.pipe = pipe
        self.metrics = metrics
        self.cluster = cluster
        self.poll = poll
        self.restart_timeout = restart_timeout
        # Bounds one call of ``_rebuild``, which may wait for the pipeline's own
        # rebuild (that one gives up and undoes itself well before).
        self.call_timeout = call_timeout
        self._call = probe
        self._lost: dict[str, float] = {}  # address -> when its loss was noticed (monotonic)
        self._seen_losses = 0
        self._seen_recoveries = 0
        self._last_gap = 10.0  # seconds the last recovery took (a first guess)
        self._probe: _Probe | None = None
        self._tg: TaskGroup | None = None
        self.last_progress = -math.inf
        """When the latest call to come out of the pipeline went in (of those that came
        out, the latest to go in)."""
        self._progress_count = 0
        self.spans: deque[Span] = deque(maxlen=1000)

    async def __aenter__(self) -> Recovery:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        if self.cluster is not None:
            self._tg.start_soon(self._watch)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        # Its own tasks only: an exception of the block is not this group's to handle.
        await self._tg.__aexit__(None, None, None)

    # -- what requests ask -----------------------------------------------------------------

    def progress(self, since: float) -> None:
        """A real call that entered the pipeline at ``since`` (``time.monotonic()``)
        came out of its last stage just now. A health check counts it if it came out
        while the check waited and entered at most the check's timeout before the check
        began: calls queue behind each other, so under load the ones that come out
        first went in before the check; one that went in long ago may have been past a
        stage before that stage died, and proves nothing about it."""
        if since > self.last_progress:
            self.last_progress = since
            self._progress_count += 1

    def refusing(self) -> bool:
        """A worker is lost and the model has no other copy: until the stages it held
        are rebuilt, requests would only wait. (With replicas they go on: to a copy that
        is whole, or they wait the few seconds the pipeline takes to rebuild.)"""
        self._notice()
        return bool(self._lost) and self.pipe.replicas == 1

    def retry_after(self) -> int:
        """Seconds until the model is likely whole again: what the last recovery took,
        less the time this one has run (at least 1)."""
        if not self._lost:
            return 1
        elapsed = time.monotonic() - min(self._lost.values())
        return max(1, min(60, math.ceil(self._last_gap - elapsed)))

    def describe(self) -> str:
        now = time.monotonic()
        return "; ".join(f"the worker at {address} was lost {now - since:.1f} s ago and its "
                         "stages are being rebuilt" for address, since in self._lost.items())

    async def check(self, timeout: float) -> None:
        """Returns if one call went through every stage, or if real calls got through
        every stage while this one waited (busy, not dead: see ``progress``); raises
        ``TimeoutError`` or the call's error.
        The call runs in a task of its own, so a caller that gives up does not cancel
        it (it may be the call that rebuilds a lost stage)."""
        assert self._tg is not None, "use Recovery inside 'async with'"
        asked = time.monotonic()
        seen = self._progress_count
        probe = self._probe
        if probe is None or probe.done.is_set():
            probe = self._probe = _Probe()
            self._tg.start_soon(self._run_probe, probe)
        deadline = asked + timeout
        while not probe.done.is_set():
            if self._progress_count != seen and self.last_progress >= asked - timeout:
                return  # busy, not dead: a recent call came out while this one waited
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"a call through every stage did not return within "
                                   f"{timeout} s, and no other recent call got through "
                                   "meanwhile")
            with anyio.move_on_after(min(left, 0.05)):
                await probe.done.wait()
        if probe.error is not None:
            raise probe.error

    async def _run_probe(self, probe: _Probe) -> None:
        try:
            await self._call()
            self.progress(probe.started)
        except Exception as exc:
            probe.error = exc
        finally:
            probe.done.set()

    # -- watching ---------------------------------------------------------------------------

    async def _watch(self) -> None:
        assert self.cluster is not None and self._tg is not None
        next_stats = time.monotonic()
        while True:
            self._notice()
            if time.monotonic() >= next_stats:  # a recovery nothing here started
                await self._note_pipeline_recoveries()
                next_stats = time.monotonic() + 5.0
            await anyio.sleep(self.poll)

    def _notice(self) -> None:
        """Take up the workers the cluster has seen end since the last look: asked by
        every request too, not only by the poll, so that none is told the model is
        whole in the moment between a worker's end and the next poll."""
        if self.cluster is None or self._tg is None:
            return
        for node, ended in self.cluster.lost[self._seen_losses:]:
            self._seen_losses += 1
            self._lost[node.address] = time.monotonic()
            self._tg.start_soon(self._replace, node, ended)

    async def _replace(self, node: RemoteNode, ended: WorkerExit) -> None:
        assert self.cluster is not None
        noticed, since = time.time(), self._lost[node.address]
        log.info("worker %s (pid %d) %s; replacing it", node.address, ended.pid,
                 ended.cause)
        try:
            new = await self.cluster.replacement(node, timeout=self.restart_timeout)
        except (ShardlineError, TimeoutError) as exc:
            log.error("the worker at %s was not replaced: %s; the model stays unavailable",
                      node.address, exc)
            return
        self.metrics.recoveries.labels("worker").inc()
        self.spans.append(Span("worker restarted", "worker", noticed, time.time(), {
            "lost": node.address, "pid": ended.pid, "cause": ended.cause,
            "new": new.address, "new_pid": new.pid}))
        await self._rebuild(node.address)
        del self._lost[node.address]
        self._last_gap = time.monotonic() - since
        await self._note_pipeline_recoveries()
        log.warning("recovered from the loss of %s in %.1f s: %s is whole again",
                    node.address, self._last_gap, self.name)

    async def _rebuild(self, address: str) -> None:
        """Calls through the pipeline until none of its stages is on ``address``: the
        call that finds the lost stage makes the pipeline rebuild it (with replicas, the
        calls take turns over the copies, so one of them finds it)."""
        pause = 0.25
        while any(dev.place.node == address for dev in self.pipe.plan.all_devices()):
            try:
                since = time.monotonic()
                with anyio.fail_after(self.call_timeout):
                    await self._call()
                self.progress(since)
            except (ShardlineError, TimeoutError) as exc:
                log.warning("rebuilding the stages lost with %s: %s; trying again in "
                            "%.1f s", address, exc, pause)
                await anyio.sleep(pause)
                pause = min(pause * 2, 5.0)

    async def _note_pipeline_recoveries(self) -> None:
        try:
            with anyio.fail_after(5):
                stats = await self.pipe.stats()
        except (ShardlineError, TimeoutError):
            return
        for record in stats["recoveries"][self._seen_recoveries:]:
            self._seen_recoveries += 1
            self.metrics.recoveries.labels("stage").inc()
            start = float(record["start"])
            self.spans.append(Span("stages rebuilt", "stage", start,
                                   start + float(record["seconds"]), {
                                       k: record.get(k) for k in
                                       ("lost", "stages", "moved_to", "from", "error")}))

    # -- the trace ------------------------------------------------------------------------

    def chrome(self) -> dict[str, Any]:
        """Every recovery kept (the last 1000) as Chrome trace-event JSON (Perfetto,
        chrome://tracing): one row for worker restarts, one for stages rebuilt."""
        rows = {"worker": 0, "stage": 1}
        events: list[dict[str, Any]] = [
            {"name": "process_name", "ph": "M", "pid": 0, "tid": 0,
             "args": {"name": "recoveries"}},
            {"name": "thread_name", "ph": "M", "pid": 0, "tid": 0,
             "args": {"name": "worker processes"}},
            {"name": "thread_name", "ph": "M", "pid": 0, "tid": 1,
             "args": {"name": "pipeline stages"}}]
        for span in self.spans:
            events.append({"name": span.name, "cat": f"recovery,{span.what}", "ph": "X",
                           "pid": 0, "tid": rows[span.what], "ts": span.start * 1e6,
                           "dur": max(0.0, span.end - span.start) * 1e6,
                           "args": span.args})
        return {"traceEvents": events, "displayTimeUnit": "ms"}
