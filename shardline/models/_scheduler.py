"""The scheduler actor: runs training steps and inference calls over every replica of the
pipeline, and brings a step through the loss of a node.

A training step runs alone and in call order (``StepGate``): two overlapping steps
would interleave their forwards and backwards on the same weights. It has two phases:
every device runs its part of the schedule (``StageActor.run``), and only when all of
them succeeded does every device apply its optimizer (``commit``). With snapshots on,
each commit may also copy the stage's state to host memory; the copies are sent to
their holders on other nodes while the next step computes, and a version counts once
every holder has it (``stable``).

When a step fails because nodes were lost, ``_recovery`` moves their devices to spares,
restores their state and the step runs again. Concurrent ``generate`` requests share
prefill calls and decode steps (``_batching`` queues them, ``_batched`` runs them).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import anyio
import torch

from .. import Actor, ActorError, ActorRef, ShardlineError
from . import _tree
from ._batched import Call, fail, plan, run_calls
from ._batching import DecodeBatcher, Diverged, PrefillQueue, Row
from ._errors import PipelineError, RecoveryFailed
from ._fleet import Fleet
from ._gate import StepGate
from ._plan import DevicePlan, Plan
from ._recovery import heal, recover
from .schedules import Action, merge_local_backwards

__all__ = ["Scheduler"]

log = logging.getLogger("shardline.models")

Key = tuple[int, int]


class Scheduler(Actor):
    """Runs steps: hands every device its part of the schedule, waits for all of them,
    and turns the first failure into a ``PipelineError`` (cancelling the rest)."""

    # Concurrent inference calls overlap in the pipeline, and every running generate
    # request waits here for its next decode step.
    max_concurrency = 512
    decode_rows = 64      # the most requests one decode step (or prefill call) runs
    join_wait_s = 0.002   # how long a decode step waits for the last one's rows
    prefill_chunk = 128   # the most tokens of one prompt a prefill call takes
    prefill_tokens = 1024  # the most tokens (rows x the longest) of a prefill call
    # Chains of requests whose decode steps are in flight at once, each with its share
    # of the requests (None: one per device of a replica, as vLLM's pipeline-parallel
    # virtual engines). More than one keeps several devices busy at once, but each
    # step reads every weight again, a step of a few rows is mostly per-call overhead
    # (a chain needs ``decode_min_rows`` requests), and devices that share a host's
    # cores gain nothing: two chains over two stage processes on a 2-core host ran at
    # 0.9x of one (bench.generate). So one, unless the devices have compute of their
    # own (GPUs, hosts).
    decode_groups: int | None = 1
    decode_min_rows = 8
    # A greedy request's next decode step may go out while the one it goes on from is
    # in flight, its input handed from the last stage to the first (``_batching``).
    decode_ahead = True

    def __init__(self, fleet: Fleet, trace: bool = False, snapshot_every: int = 0,
                 probe_timeout: float = 2.0, max_recoveries: int = 8) -> None:
        self.fleet = fleet
        self.tracing = trace
        self.snapshot_every = snapshot_every
        self.probe_timeout = probe_timeout
        self.max_recoveries = max_recoveries
        self._steps = itertools.count()
        # Recorded steps, oldest dropped first: a long run with tracing on stays bounded.
        self._records: deque[dict[str, Any]] = deque(maxlen=10_000)
        self._gate = StepGate()
        self.committed = 0                      # training steps done
        self._stable: int | None = None         # newest snapshot every holder has
        self._taken: int | None = None          # newest snapshot taken, maybe not sent
        self._history: list[tuple[int, Any, Any]] = []  # (version it makes, x, y)
        self._last_loss = math.nan
        self.recoveries: list[dict[str, Any]] = []
        self.nonfinite_losses = 0
        self.loaded = False  # state replaced since start: a fresh build is not it
        self._next_replica = 0
        self._down: set[int] = set()               # replicas with a lost node, no spare
        self._pins: dict[str, _Pin] = {}           # where each cached request's state is
        self._prefills = PrefillQueue(functools.partial(self._start_loop, "prefill"),
                                      self.decode_rows, self.prefill_chunk,
                                      self.prefill_tokens)
        self._decodes = DecodeBatcher(functools.partial(self._start_loop, "decode"),
                                      self.decode_rows, self.join_wait_s)
        self._loops: dict[str, str] = {}  # the id each queue's loop must be started with
        self.batched = {q: {"calls": 0, "rows": 0, "max_rows": 0, "ahead_rows": 0}
                        for q in ("prefill", "decode")}
        # An I whose gradient stays on its device runs with its W as one backward.
        self._programs = [_program(acts) for acts
                          in merge_local_backwards(self.plan.schedule).actions]

    @property
    def plan(self) -> Plan:
        return self.fleet.plan

    async def on_start(self) -> None:
        if self.snapshot_every:
            # Version 0, the starting state, is held before the first step, so even a
            # node lost during it costs nothing.
            await self._each(lambda dev, ref: ref.take_snapshot(0))
            self._taken = 0
            await self._push(0)

    def set_tracing(self, on: bool) -> None:
        self.tracing = on

    def take_trace(self) -> list[dict[str, Any]]:
        """The steps recorded since the last call (and forget them)."""
        records = list(self._records)
        self._records.clear()
        return records

    def stats(self) -> dict[str, Any]:
        return {"steps": self.committed, "stable_snapshot": self._stable,
                "recoveries": list(self.recoveries),
                "nonfinite_losses": self.nonfinite_losses,
                "prefill": dict(self.batched["prefill"]),
                "decode": dict(self.batched["decode"])}

    async def resnapshot(self) -> None:
        """The state was replaced (a checkpoint loaded): it becomes the stable snapshot,
        since rolling back past it would undo the load."""
        async with self._gate.hold(exclusive=True):
            self.loaded = True
            if not self.snapshot_every:
                return
            version = self.committed
            await self._each(lambda dev, ref: ref.take_snapshot(version))
            self._taken = version
            self._history.clear()
            await self._push(version)

    # -- training ------------------------------------------------------------------------

    async def train_step(self, x: Any, y: Any) -> float:
        async with self._gate.hold(exclusive=True):
            if self.snapshot_every:
                # kept until a snapshot after this step is stable: a rollback replays it
                self._history.append((self.committed + 1, x, y))
            redo = [(x, y)]
            attempts = 0
            while redo:
                try:
                    await self._step(*redo[0])
                except PipelineError as exc:
                    attempts += 1
                    redo = await recover(self, exc, attempts, redo)
                    continue
                redo.pop(0)
            return self._last_loss

    async def _step(self, x: Any, y: Any) -> None:
        """One attempt at one step: the run phase on every device of every replica, then
        the commit phase. Raises ``PipelineError`` (weights untouched unless the commit
        phase itself failed)."""
        plan = self.plan
        schedule = plan.schedule
        m, replicas = schedule.n_microbatches, plan.replicas
        xs = _tree.split(x, replicas) if replicas > 1 else [x]
        ys = _tree.split(y, replicas) if replicas > 1 else [y]
        step = next(self._steps)
        started = time.time()
        first = schedule.device_of(0)
        last = schedule.device_of(schedule.n_stages - 1)
        trace = self.tracing
        results: dict[Key, dict[str, Any]] = {}
        failure: list[tuple[Key, BaseException]] = []

        async def one(dev: DevicePlan, ref: ActorRef, inputs: Any, targets: Any) -> None:
            try:
                results[dev.key] = await ref.run(step, self._programs[dev.index], inputs,
                                                 targets, True, m, trace)
            except Exception as exc:
                if not failure:
                    failure.append((dev.key, exc))
                tg.cancel_scope.cancel()

        async def push(version: int) -> None:
            try:
                await self._push(version)
            except PipelineError as exc:
                if isinstance(exc.__cause__, ActorError):
                    # The stage could not take or send it (not a lost node): pushing
                    # it again would fail again; the next commit's snapshot replaces it.
                    self._taken = self._stable
                if not failure:
                    failure.append(((exc.replica, exc.stage), exc))
                tg.cancel_scope.cancel()

        async with anyio.create_task_group() as tg:
            for r in range(replicas):
                inputs = dict(enumerate(_tree.split(xs[r], m)))
                targets = dict(enumerate(_tree.split(ys[r], m)))
                for dev in plan.devices[r]:
                    tg.start_soon(one, dev, self.fleet.refs[dev.key],
                                  inputs if dev.index == first else None,
                                  targets if dev.index == last else None)
            if self._taken is not None and self._taken != self._stable:
                tg.start_soon(push, self._taken)
        if failure:
            raise self._error(failure[0], "")
        losses = [v for r in range(replicas) for v in results[(r, last)]["losses"].values()]
        nonfinite = sum(1 for v in losses if not math.isfinite(v))
        if nonfinite:
            self.nonfinite_losses += nonfinite
            if self.node.metrics is not None:
                self.node.metrics.count_nonfinite(nonfinite)
        self._last_loss = sum(losses) / len(losses)

        version = self.committed + 1
        snapshot = version if self.snapshot_every and version % self.snapshot_every == 0 \
            else None
        commits = await self._each(
            lambda dev, ref: ref.commit(snapshot, self._stable), " in the optimizer step")
        self.committed = version
        if snapshot is not None:
            self._taken = snapshot
        if trace:
            devices: list[list[Any]] = []
            for dev in plan.all_devices():
                spans = results[dev.key].pop("spans", [])
                spans += commits[dev.key]
                devices.append(spans)
            self._records.append({"step": step, "what": "train", "start": started,
                                  "end": time.time(), "devices": devices,
                                  "replicas": plan.replicas})

    async def _each(self, call: Any, doing: str = "") -> dict[Key, Any]:
        """``call(dev, ref)`` on every device at once; the first failure, as a
        ``PipelineError``, after all have settled."""
        results: dict[Key, Any] = {}
        failure: list[tuple[Key, BaseException]] = []

        async def one(dev: DevicePlan) -> None:
            try:
                results[dev.key] = await call(dev, self.fleet.refs[dev.key])
            except Exception as exc:
                failure.append((dev.key, exc))

        async with anyio.create_task_group() as tg:
            for dev in self.plan.all_devices():
                tg.start_soon(one, dev)
        if failure:
            raise self._error(failure[0], doing)
        return results

    def _error(self, failure: tuple[Key, BaseException], doing: str) -> PipelineError:
        (r, d), exc = failure
        if isinstance(exc, PipelineError):
            return exc
        where = f"stage {d}" + (f" of replica {r}" if self.plan.replicas > 1 else "")
        error = PipelineError(f"{where} failed{doing}: {type(exc).__name__}: {exc}", d, r)
        error.__cause__ = exc
        return error

    async def _push(self, version: int) -> None:
        """Send snapshot ``version`` from every device to its holder; then it is the
        stable one, and the batches before it are not needed any more."""
        fleet = self.fleet
        failure: list[tuple[Key, BaseException]] = []

        async def one(dev: DevicePlan) -> None:
            if dev.holder is None:
                return  # one node only: the local copy is all there is
            try:
                await fleet.refs[dev.key].push_snapshot(fleet.holders[dev.holder],
                                                        fleet.snapshot_key(dev), version)
            except Exception as exc:
                failure.append((dev.key, exc))

        async with anyio.create_task_group() as tg:
            for dev in self.plan.all_devices():
                tg.start_soon(one, dev)
        if failure:
            raise self._error(failure[0], f" sending snapshot {version} to its holder")
        self._stable = version
        self._history = [h for h in self._history if h[0] > version]

    # -- inference -------------------------------------------------------------------------

    async def infer(self, x: Any, cache: str | None = None) -> Any:
        """Inference on one replica. When a node is lost under it: with spares the
        pipeline heals and the call runs again; with replicas it runs again on another;
        a call with ``cache`` raises instead (its state went with the node), with the
        error's ``recovered`` set when the pipeline is whole again, so the caller can
        replay the request (``Pipeline.generate`` does). So does a call with ``cache``
        whose state was on a stage that has been replaced since its last call."""
        if cache is not None:
            self._check_pin(cache)
        attempts = 0
        while True:
            async with self._gate.hold(exclusive=False):
                replica = self._replica_for(cache)
                try:
                    output, _ = await self._infer(x, cache, replica)
                    return output
                except PipelineError as exc:
                    failure = exc
            attempts += 1
            await self._mend(failure, attempts)
            if cache is not None:
                failure.recovered = True
                self._unpin(cache)
                raise failure

    async def prefill(self, cache: str, tokens: list[int],
                      greedy: bool = False) -> torch.Tensor | int:
        """Request ``cache``'s ``tokens`` (a new prompt; a new id starts a request)
        through the pipeline, in calls shared with the other prompts waiting (at most
        ``prefill_chunk`` tokens of each per call, ``prefill_tokens`` in all): the
        logits that follow its last token (``[vocab]``), or with ``greedy`` their
        argmax. Errors as ``infer``'s for a call with ``cache``."""
        if not tokens:
            raise ValueError("the prompt is empty")
        self._check_pin(cache)
        result: torch.Tensor | int = await self._prefills.submit(
            cache, [int(t) for t in tokens], bool(greedy))
        return result

    async def decode(self, cache: str, token: int, greedy: bool = False,
                     more: bool = False) -> torch.Tensor | int:
        """The logits (``[vocab]``) that follow ``token`` in request ``cache`` (whose
        earlier tokens went through ``prefill``), or with ``greedy`` their argmax: one
        row of the next decode step, which runs every request waiting for one as a
        single batch. ``more``: the caller will ask for the token after the one this
        returns (unless it is a stop token); a greedy request that will may have that
        step run ahead (``_batching``), so it must then go on from this call's result.
        Errors as ``infer``'s for a call with ``cache``."""
        if self._check_pin(cache) is None:
            raise LookupError(f"request {cache} has no cached state: its prompt goes "
                              "through prefill first")
        try:
            result: torch.Tensor | int = await self._decodes.submit(
                cache, [int(token)], bool(greedy), bool(more))
        except Diverged as exc:
            # Its state on the stages went on from another token: only a replay helps.
            pin = self._pins.get(cache)
            self._unpin(cache)
            error = PipelineError(str(exc), 0, pin.replica if pin is not None else 0)
            error.recovered = True
            raise error from None
        return result

    async def batch_loop(self, queue: str, loop_id: str) -> None:
        """Runs the batched calls of ``queue`` ("prefill" or "decode") while requests
        wait for them. Not for callers: the scheduler starts it on its own mailbox
        when a request arrives and none runs (so it belongs to this actor and ends
        with it); any other call returns at once."""
        if not loop_id or self._loops.get(queue) != loop_id:
            return
        self._loops[queue] = ""  # this one runs: the id cannot start a second
        rows_of: PrefillQueue | DecodeBatcher = \
            self._prefills if queue == "prefill" else self._decodes
        self._decodes.groups = self.decode_groups or len(self.fleet.replica(0))
        self._decodes.min_rows = self.decode_min_rows
        self._decodes.ahead = self.decode_ahead

        async def call(rows: list[Row], calls: list[Call]) -> None:
            try:
                await run_calls(self, calls)
            except Exception as exc:  # a bug: this call's requests fail, the others go on
                log.exception("a batched %s call failed", queue)
                fail(rows, exc)
            except BaseException:
                fail(rows, PipelineError("the pipeline stopped", 0))
                raise
            finally:
                rows_of.finished(rows)

        try:
            async with anyio.create_task_group() as tg:
                while True:
                    rows = await rows_of.next_rows()
                    if not rows:
                        return
                    # Planned here: a step run ahead takes the id the one it goes
                    # on from reserved.
                    calls = plan(self, rows, rows_of is self._prefills)
                    if rows_of is self._prefills:
                        await call(rows, calls)  # one at a time, between decode steps
                    else:
                        tg.start_soon(call, rows, calls)
        except BaseException as exc:
            rows_of.fail_all(exc if isinstance(exc, Exception)
                             else PipelineError("the pipeline stopped", 0))
            raise

    async def _start_loop(self, queue: str) -> None:
        self._loops[queue] = loop_id = secrets.token_hex(8)
        await self.ref.tell("batch_loop", queue, loop_id)

    async def _mend(self, failure: PipelineError, attempts: int) -> None:
        """After a failed inference call: heal the pipeline (spares) or take the
        replica that lost a node out of rotation (replicas); raises ``failure`` when no
        node was lost or nothing can be done."""
        lost = await self.fleet.lost_nodes(self.probe_timeout)
        if not lost or attempts > self.max_recoveries:
            raise failure
        if self.fleet.can_replace():
            async with self._gate.hold(exclusive=True):
                # another call may have healed it meanwhile
                if await self.fleet.lost_nodes(self.probe_timeout):
                    try:
                        await heal(self, failure)
                    except RecoveryFailed:
                        return  # undone: the call runs again, and heals again if need be
                self._down.clear()
        else:
            self._down |= {dev.replica for dev in self.plan.on_nodes(lost)}
            if len(self._down) == self.plan.replicas:
                raise failure

    def _check_pin(self, cache: str) -> _Pin | None:
        """Where request ``cache``'s state is (``None``: a new request); raises
        (``recovered``) when a stage of that replica was replaced since, or the replica
        is out of rotation: the state is gone, and the caller may replay the request."""
        pin = self._pins.get(cache)
        if pin is None:
            return None
        if pin.lost or pin.replica in self._down or \
                pin.refs != self.fleet.replica(pin.replica):
            pin.lost = True
            error = PipelineError(f"request {cache}: a stage holding its state was lost "
                                  "and replaced", 0, pin.replica)
            error.recovered = True
            raise error
        return pin

    def _unpin(self, cache: str) -> None:
        """Request ``cache`` lost its state: it can only be released (which frees what
        is left of it on the stages that survived) and replayed under a new id."""
        pin = self._pins.get(cache)
        if pin is not None:
            pin.lost = True

    def _replica_for(self, cache: str | None) -> int:
        """The replica for a call: round robin over those not down; every call of one
        cached request goes where its state is."""
        if cache is not None:
            pin = self._pins.get(cache)
            if pin is not None:
                return pin.replica
        up = [r for r in range(self.plan.replicas) if r not in self._down]
        self._next_replica += 1
        replica = up[self._next_replica % len(up)] if up else 0
        if cache is not None:
            self._pins[cache] = _Pin(replica, self.fleet.replica(replica))
            if len(self._pins) > 65536:  # requests never released
                del self._pins[next(iter(self._pins))]
        return replica

    async def _infer(self, x: Any, cache: str | list[str] | None, r: int,
                     greedy: list[bool] | None = None, lengths: list[int] | None = None,
                     step: int | None = None, feed: list[int] | None = None,
                     feed_to: int | None = None) -> tuple[Any, dict[int, PipelineError]]:
        """One forward pass on replica ``r``: the output, and for a batched call (a list
        of cache ids, one per row: ``StageActor.run``) the rows that failed alone.
        ``step``: its id, when planned ahead; ``feed`` and ``feed_to`` as in
        ``StageActor.run`` (for the first and the last stage)."""
        schedule = self.plan.schedule
        first = _tree.leaves(x)
        m = max(1, min(schedule.n_microbatches, first[0].shape[0] if first else 1))
        if cache is not None:
            m = 1  # a cached request's state belongs to its whole batch
        xs = _tree.split(x, m)
        programs = [_program([a for a in acts if a.kind == "F" and a.mb < m])
                    for acts in schedule.actions]
        refs = self.fleet.replica(r)
        step = next(self._steps) if step is None else step
        started = time.time()
        first_device = schedule.device_of(0)
        last_device = schedule.device_of(schedule.n_stages - 1)
        results: list[dict[str, Any]] = [{} for _ in refs]
        failure: list[tuple[Key, BaseException]] = []

        async def one(d: int, ref: ActorRef) -> None:
            try:
                results[d] = await ref.run(
                    step, programs[d], dict(enumerate(xs)) if d == first_device else None,
                    None, False, m, self.tracing, cache, greedy, lengths,
                    feed if d == first_device else None,
                    feed_to if d == last_device else None)
            except Exception as exc:
                if not failure:
                    failure.append(((r, d), exc))
                tg.cancel_scope.cancel()

        async with anyio.create_task_group() as tg:
            for d, ref in enumerate(refs):
                tg.start_soon(one, d, ref)
        if failure:
            raise self._error(failure[0], "")
        if self.tracing:
            what = "infer" if not isinstance(cache, list) else \
                "prefill" if lengths is not None else "decode"
            record = {"step": step, "what": what, "start": started, "end": time.time(),
                      "devices": [r.pop("spans", []) for r in results]}
            self._records.append(record)
        errors: dict[int, PipelineError] = {}
        for d, result in enumerate(results):  # the first stage a row failed on counts
            for row, message in result.get("row_errors", {}).items():
                if int(row) not in errors:
                    errors[int(row)] = PipelineError(
                        f"stage {d}{f' of replica {r}' if self.plan.replicas > 1 else ''}"
                        f" failed for this request: {message}", d, r)
        outputs = results[last_device]["outputs"]
        if m == 1:  # torch.cat copies even one tensor, slowly for [rows, 1, vocab] logits
            return outputs[0], errors
        return _tree.cat([outputs[i] for i in range(m)]), errors

    async def release(self, cache: str) -> None:
        """Request ``cache`` ended: it leaves the decode batch, and every stage frees
        its state."""
        self._prefills.leave(cache)
        self._decodes.leave(cache)
        pin = self._pins.pop(cache, None)
        if pin is None:
            return
        # The stages it started on: after a recovery, the survivors still hold its state.
        for ref in pin.refs:
            with contextlib.suppress(ShardlineError):  # a lost node: nothing left to free
                await ref.tell("release", cache)


class _Pin:
    """Where a cached request's state lives: its replica, and that replica's stage
    actors when it started (a stage replaced since holds none of it)."""

    __slots__ = ("lost", "refs", "replica")

    def __init__(self, replica: int, refs: list[ActorRef]) -> None:
        self.replica = replica
        self.refs = refs
        self.lost = False  # part of its state went with a lost node



def _program(actions: Sequence[Action]) -> list[list[Any]]:
    """Actions as the stage actor reads them: ``[stage, kind, microbatch]``."""
    return [[a.stage, a.kind, a.mb] for a in actions]
