"""Schedules as data, checked against the papers with the simulator."""

from __future__ import annotations

import pytest

from shardline.models import schedules as S


@pytest.mark.parametrize(("p", "m"), [(2, 1), (2, 4), (4, 8), (4, 4), (3, 7), (8, 32)])
@pytest.mark.parametrize("costs", [(1.0, 1.0), (1.0, 2.0)])
def test_gpipe_and_1f1b_bubble_is_p_minus_1_over_m_plus_p_minus_1(
        p: int, m: int, costs: tuple[float, float]) -> None:
    for schedule in (S.gpipe(p, m), S.one_f_one_b(p, m)):
        sim = S.simulate(schedule, *costs)
        assert sim.bubble_fraction == pytest.approx((p - 1) / (m + p - 1))
        assert sim.makespan == pytest.approx((m + p - 1) * sum(costs))


@pytest.mark.parametrize(("p", "m"), [(2, 4), (4, 8), (4, 4), (3, 7), (4, 2)])
def test_1f1b_holds_at_most_p_minus_s_activations_while_gpipe_holds_m(p: int, m: int) -> None:
    assert S.simulate(S.gpipe(p, m)).peak_activations == tuple([m] * p)
    peaks = S.simulate(S.one_f_one_b(p, m)).peak_activations
    assert peaks == tuple(min(p - s, m) for s in range(p))


@pytest.mark.parametrize(("p", "m", "v"), [(2, 4, 2), (4, 8, 2), (4, 8, 4), (4, 16, 2),
                                           (3, 6, 3)])
@pytest.mark.parametrize("costs", [(1.0, 1.0), (1.0, 2.0)])
def test_interleaved_bubble_is_v_times_smaller(p: int, m: int, v: int,
                                               costs: tuple[float, float]) -> None:
    base = S.simulate(S.one_f_one_b(p, m), *costs)
    inter = S.simulate(S.interleaved_1f1b(p, m, v), *costs)
    # Megatron-LM's form: bubble time / ideal time = (p - 1) / (v m)
    assert (inter.makespan - inter.ideal) / inter.ideal == pytest.approx((p - 1) / (v * m))
    ratio = ((base.makespan - base.ideal) / base.ideal) / (
        (inter.makespan - inter.ideal) / inter.ideal)
    assert ratio == pytest.approx(v)
    assert inter.ideal == pytest.approx(base.ideal)


def test_actions_round_trip_and_tables() -> None:
    for text in ("2F0", "0B13", "11F2"):
        assert str(S.Action.from_str(text)) == text
    with pytest.raises(ValueError):
        S.Action.from_str("2X0")
    golden = ("dev0: 0F0 0F1 0B0 0F2 0B1 0F3 0B2 0B3\n"
              "dev1: 1F0 1B0 1F1 1B1 1F2 1B2 1F3 1B3")
    assert S.one_f_one_b(2, 4).table() == golden
    assert S.gpipe(2, 2).table() == "dev0: 0F0 0F1 0B1 0B0\ndev1: 1F0 1F1 1B1 1B0"
    inter = S.interleaved_1f1b(2, 2, 2)
    assert inter.n_stages == 4 and inter.chunks == 2
    assert inter.table().startswith("dev0: 0F0 0F1 2F0 2F1")


def test_every_schedule_is_valid_and_deadlock_free() -> None:
    for p in range(1, 6):
        for m in range(1, 10):
            for schedule in (S.gpipe(p, m), S.one_f_one_b(p, m)):
                schedule.validate()
                S.simulate(schedule)
            for v in (1, 2, 3):
                if m % p == 0:
                    S.simulate(S.interleaved_1f1b(p, m, v))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="divisible"):
        S.interleaved_1f1b(4, 6, 2)
    with pytest.raises(ValueError):
        S.one_f_one_b(0, 4)
    with pytest.raises(ValueError, match="unknown schedule"):
        S.by_name("zero-bubble", 2, 4)
    broken = S.Schedule("broken", 2, 2, 1, ((S.Action(0, "F", 0), S.Action(0, "B", 0)),
                                            (S.Action(1, "B", 0), S.Action(1, "F", 0))))
    with pytest.raises(ValueError):
        S.simulate(broken)


def test_the_package_exports_exactly_its_public_names() -> None:
    import types

    public = {name for name, value in vars(S).items()
              if not name.startswith("_") and not isinstance(value, types.ModuleType)
              and name != "annotations"}
    assert public == set(S.__all__)
    for name in ("Action", "Schedule", "Simulation", "simulate", "by_name", "gpipe",
                 "one_f_one_b", "interleaved_1f1b", "zb_h1", "zbv", "dualpipe_v", "search"):
        assert name in S.__all__


def test_the_docs_print_the_schedules_as_they_are() -> None:
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "pipelines.md").read_text(encoding="utf-8")
    for schedule in (S.one_f_one_b(4, 8), S.interleaved_1f1b(2, 4, 2), S.zb_h1(4, 8),
                     S.zbv(4, 8), S.dualpipe_v(4, 8)):
        assert schedule.table() in doc, schedule.name
