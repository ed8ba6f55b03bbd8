"""How the scheduler brings the pipeline back after nodes were lost.

The lost nodes' devices move to spares (``Fleet.replace``) and get their state from a
surviving replica of the same stage when there is one (nothing else rolls back),
otherwise every device rolls back to the stable snapshot and the steps since it are
replayed from the batches the scheduler kept. Kernels being deterministic, the result
is bitwise the run that never failed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import anyio

from .._errors import ShardlineError
from ._errors import PipelineError, PlanError, RecoveryFailed
from ._plan import DevicePlan, Plan

if TYPE_CHECKING:
    from ._scheduler import Scheduler

__all__ = ["heal", "recover"]

log = logging.getLogger("shardline.models")

Key = tuple[int, int]  # (replica, device)

# A rebuild past this is given up and undone (a node that answers but never finishes
# its part would otherwise hold every call of the pipeline, which waits for it).
REBUILD_TIMEOUT = 120.0


async def recover(s: Scheduler, exc: PipelineError, attempts: int,
                  redo: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """Bring the pipeline back after a failed training step, or raise ``exc``.
    Returns the batches to run (again)."""
    if attempts > s.max_recoveries:
        raise exc
    while True:
        try:
            mode = await heal(s, exc)
            break
        except RecoveryFailed:
            # undone: heal again, with whatever else was lost meanwhile
            attempts += 1
            if attempts > s.max_recoveries:
                raise
    if mode == "snapshot":
        # everything rolled back to the stable version: replay from there
        assert s._stable is not None
        return [(x, y) for version, x, y in s._history if version > s._stable]
    versions = await s._each(lambda dev, ref: ref.alive())
    if all(v == s.committed + 1 for v in versions.values()):
        # the commit phase failed after every survivor committed: the step is done
        s.committed += 1
        return redo[1:]
    return redo


async def heal(s: Scheduler, exc: PipelineError) -> str:
    """Replace the devices of lost nodes and restore their state; raises ``exc``
    when no node was lost (a stage raised: it would raise again) or when the
    pipeline cannot recover, and ``RecoveryFailed`` when the rebuild could not finish
    (the pipeline is then as it was before, and a later call heals again). Returns
    where the state came from: ``"replica"``, ``"snapshot"`` (every device rolled back
    to the stable version) or ``"fresh"`` (nothing trained yet: a new stage built from
    the spec is the state)."""
    fleet = s.fleet
    if not fleet.can_replace():
        raise exc
    lost = await fleet.lost_nodes(s.probe_timeout)
    if not lost:
        raise exc
    started = time.time()
    old = fleet.plan
    gone = old.on_nodes(lost)
    sources = _sources(s, old, lost, exc)
    saved = fleet.checkpoint()
    log.info("rebuilding stages %s lost with %s",
             sorted({stage for dev in gone for stage in dev.stages}), ", ".join(sorted(lost)))
    try:
        with anyio.fail_after(REBUILD_TIMEOUT):
            mode, moved = await _rebuild(s, old, lost, sources, saved.holders)
    except BaseException as error:
        # Undone as a whole, whatever stopped it: no replica is ever left half moved.
        await fleet.revert(saved)
        if isinstance(error, PlanError):
            raise PipelineError(f"{exc}; cannot recover: {error}", exc.stage,
                                exc.replica) from exc
        if not isinstance(error, (ShardlineError, TimeoutError)):
            raise
        # Another node lost meanwhile (the new one, the copy the state comes from), or
        # past the deadline: a later call heals again.
        why = f"no rebuild within {REBUILD_TIMEOUT} s" \
            if isinstance(error, TimeoutError) and not isinstance(error, ShardlineError) \
            else f"{type(error).__name__}: {error}"
        log.warning("rebuilding the stages lost with %s did not finish (%s); undone, "
                    "to be tried again", ", ".join(sorted(lost)), why)
        raise RecoveryFailed(f"{exc}; rebuilding the lost stages did not finish: {why}",
                             exc.stage, exc.replica) from error
    record = {
        "what": "node_lost", "lost": sorted(lost),
        "stages": sorted({s for dev in gone for s in dev.stages}),
        "moved_to": sorted({dev.place.node for dev in moved}),
        "from": mode, "step": s.committed + 1, "start": started,
        "seconds": time.time() - started, "error": str(exc)}
    s.recoveries.append(record)
    if s.node.metrics is not None:
        s.node.metrics.count_recovery("stage")
    s._records.append({"step": -1, "what": "recover", "start": started,
                          "end": time.time(), "devices": []})
    log.warning("pipeline recovered from the loss of %s in %.2f s: stages %s moved to "
                "%s, state from %s", ", ".join(sorted(lost)), record["seconds"],
                record["stages"], ", ".join(sorted({d.place.node for d in moved})),
                mode)
    return mode


async def _rebuild(s: Scheduler, old: Plan, lost: set[str],
                   sources: dict[Key, tuple[str, Key | None]],
                   old_holders: dict[str, Any]) -> tuple[str, list[DevicePlan]]:
    """``heal``'s part that changes the fleet: re-place, relink, restore state."""
    fleet = s.fleet
    _, moved = await fleet.replace(lost)
    modes = {mode for mode, _ in sources.values()}
    mode = "snapshot" if "snapshot" in modes else "replica" if "replica" in modes \
        else "fresh"
    for dev in moved:
        ref = fleet.refs[dev.key]
        kind, sibling = sources[dev.key]
        if mode == "snapshot":
            holder = old.device(dev.key).holder
            if kind == "replica" and sibling is not None:
                # its snapshot is its sibling's: replicas are bitwise equal
                await ref.import_state(await fleet.refs[sibling].snapshot_state(
                    s._stable))
            else:
                assert holder is not None and s._stable is not None
                await ref.fetch(old_holders[holder], fleet.snapshot_key(dev),
                                s._stable)
        elif kind == "replica" and sibling is not None:
            await ref.import_state(await fleet.refs[sibling].export_state())
        if kind == "replica" and sibling is not None and s.snapshot_every:
            # The sibling's snapshots are this device's too (replicas are bitwise
            # equal): the stable one, and after a rollback-free recovery also the
            # one taken at the last commit, which the next step pushes.
            keep = {s._stable} if mode == "snapshot" else {s._stable, s._taken}
            for version in sorted(v for v in keep if v is not None):
                await ref.keep_snapshot(
                    version, await fleet.refs[sibling].snapshot_state(version))
    if mode == "snapshot":
        stable = s._stable
        assert stable is not None
        moved_keys = {dev.key for dev in moved}
        await s._each(lambda dev, ref: ref.restore(stable)
                         if dev.key not in moved_keys else _done())
        s.committed = stable
        s._taken = None
    if s.snapshot_every and s._stable is not None:
        await _rehome(s, old, moved)
    return mode, moved


def _sources(s: Scheduler, plan: Plan, lost: set[str],
             exc: PipelineError) -> dict[Key, tuple[str, Key | None]]:
    """For each device on a lost node, where its state comes from: a surviving
    sibling (the same device of another replica), the snapshot, or a fresh build
    (nothing trained or loaded yet). Raises when none is possible."""
    sources: dict[Key, tuple[str, Key | None]] = {}
    for dev in plan.on_nodes(lost):
        siblings = [other.key for replica in plan.devices for other in replica
                    if other.index == dev.index and other.place.node not in lost]
        if siblings:
            sources[dev.key] = ("replica", siblings[0])
        elif s.snapshot_every and s._stable is not None:
            if dev.holder is None or dev.holder in lost:
                raise PipelineError(
                    f"{exc}; cannot recover stage {dev.index}: its node "
                    f"{dev.place.node} and the node holding its snapshot "
                    f"{dev.holder or '(none)'} were both lost", exc.stage,
                    exc.replica) from exc
            sources[dev.key] = ("snapshot", None)
        elif s.committed == 0 and not s.loaded:
            sources[dev.key] = ("fresh", None)
        else:
            raise PipelineError(f"{exc}; cannot recover stage {dev.index}: no replica "
                                "of it survived and snapshots are off "
                                "(Pipeline.start(..., snapshot_every=N))",
                                exc.stage, exc.replica) from exc
    return sources


async def _rehome(s: Scheduler, old: Plan, moved: Sequence[DevicePlan]) -> None:
    """After a recovery: the stable snapshot of every device whose holder changed
    goes to its new holder, from the device's own copy (a moved device that copied
    a sibling kept the sibling's snapshots as its own)."""
    stable = s._stable
    assert stable is not None
    fleet = s.fleet
    moved_keys = {dev.key for dev in moved}
    for dev in fleet.plan.all_devices():
        if dev.holder is None or (dev.key not in moved_keys and
                                  dev.holder == old.device(dev.key).holder):
            continue
        await fleet.refs[dev.key].push_snapshot(fleet.holders[dev.holder],
                                                fleet.snapshot_key(dev), stable)


async def _done() -> None:
    """Nothing to do, as an awaitable (for ``Scheduler._each``)."""

