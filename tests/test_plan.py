"""Plans are data: placement, snapshot holders and re-placement after a loss, tested
without a single process."""

from __future__ import annotations

import pytest

from shardline.models import Plan, PlanError, schedules
from shardline.models._plan import LOCAL, Place, build_plan

A, B, C, D, S1, S2 = (f"tcp://10.0.0.{i}:5555" for i in range(1, 7))


def plan_of(places: list[list[Place]], spares: tuple[Place, ...] = (), chunks: int = 1,
            m: int = 4) -> Plan:
    p = len(places[0])
    schedule = schedules.by_name("interleaved-1f1b" if chunks > 1 else "1f1b", p, m, chunks)
    n = schedule.n_stages
    bounds = [(2 * s, 2 * s + 2) for s in range(n)]
    return build_plan(schedule, bounds, [str(i) for i in range(2 * n)], places, spares)


def test_devices_hold_the_schedules_stages_and_snapshot_on_the_next_node() -> None:
    plan = plan_of([[Place(A), Place(B), Place(C)]])
    assert [d.stages for d in plan.all_devices()] == [(0,), (1,), (2,)]
    assert [d.holder for d in plan.all_devices()] == [B, C, A]
    assert plan.names(1) == ["2", "3"]
    assert "r0 d1 tcp://10.0.0.2:5555/cpu stages [1] layers [2, 4) snapshot on " \
           "tcp://10.0.0.3:5555" in plan.table()


def test_interleaved_devices_hold_several_stages() -> None:
    plan = plan_of([[Place(A), Place(B)]], chunks=2)
    assert [d.stages for d in plan.all_devices()] == [(0, 2), (1, 3)]


def test_one_node_keeps_snapshots_on_a_spare_or_nowhere() -> None:
    local = [[Place(LOCAL, "cpu"), Place(LOCAL, "cpu")]]
    assert [d.holder for d in plan_of(local).all_devices()] == [None, None]
    assert [d.holder for d in plan_of(local, (Place(S1),)).all_devices()] == [S1, S1]


def test_replicas_spread_holders_over_every_node() -> None:
    plan = plan_of([[Place(A), Place(B)], [Place(C), Place(D)]])
    assert plan.replicas == 2
    assert [(d.replica, d.index, d.holder) for d in plan.all_devices()] == [
        (0, 0, B), (0, 1, C), (1, 0, D), (1, 1, A)]


def test_a_lost_node_moves_to_a_spare_and_holders_follow() -> None:
    plan = plan_of([[Place(A), Place(B, "cuda:1"), Place(C)]], (Place(S1), Place(S2)))
    after = plan.replace({B})
    moved = plan.moved(after)
    assert [(d.index, d.place) for d in moved] == [(1, Place(S1, "cuda:1"))]
    assert after.spares == (Place(S2),)
    # A's holder was B (lost): the ring is now A, S1, C
    assert [d.holder for d in after.all_devices()] == [S1, C, A]
    # devices whose holder survived keep it
    assert after.device((0, 2)).holder == A


def test_not_enough_spares_is_a_plan_error_naming_the_node() -> None:
    plan = plan_of([[Place(A), Place(B)]], (Place(S1),))
    with pytest.raises(PlanError, match=r"10\.0\.0\.2.*stages \[1\]"):
        plan.replace({A, B})


def test_bad_plans_are_refused() -> None:
    with pytest.raises(PlanError, match="places for 2 devices"):
        plan_of([[Place(A), Place(B)], [Place(C)]])
    with pytest.raises(PlanError, match="spare"):
        plan_of([[Place(A), Place(B)]], (Place(A),))
    with pytest.raises(PlanError, match="spare"):
        plan_of([[Place(A), Place(B)]], (Place(LOCAL),))
