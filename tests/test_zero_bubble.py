"""Zero-bubble schedules as data: split backwards, V placement, the papers' bubble
figures, torch pipelining's own orders action by action, and the schedule search."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardline.models import StepTrace, Trace, TraceSpan
from shardline.models import schedules as S

T = pytest.importorskip("torch.distributed.pipelining.schedules")

EQUAL = {"forward_cost": 1.0, "backward_cost": 1.0, "weight_cost": 1.0}  # F = I = W


def program(text: str) -> tuple[S.Action, ...]:
    return tuple(S.Action.from_str(a) for a in text.split())


# -- actions, placement, validation -------------------------------------------------


def test_split_backward_actions_round_trip() -> None:
    for text in ("2I0", "0W13", "11B2", "3F0"):
        assert str(S.Action.from_str(text)) == text
    assert S.Action.from_str(" 2I0 ") == S.Action(2, "I", 0)
    for bad in ("2X0", "I0", "2I", "-1F0", "2 F0"):
        with pytest.raises(ValueError, match="not an action"):
            S.Action.from_str(bad)
    assert S.KINDS == ("F", "B", "I", "W")


def test_a_schedule_carries_its_stage_to_device_map() -> None:
    assert S.one_f_one_b(4, 8).stage_to_device == (0, 1, 2, 3)
    inter = S.interleaved_1f1b(4, 8, 2)
    assert inter.stage_to_device == (0, 1, 2, 3, 0, 1, 2, 3)
    assert inter.stages_of(1) == (1, 5)
    for make in (S.zbv, S.dualpipe_v):
        v = make(4, 8)
        assert (v.n_devices, v.n_stages, v.chunks) == (4, 8, 2)
        assert v.stage_to_device == S.v_placement(4) == (0, 1, 2, 3, 3, 2, 1, 0)
        assert [v.stages_of(d) for d in range(4)] == [(0, 7), (1, 6), (2, 5), (3, 4)]
        assert all(v.device_of(s) == v.stage_to_device[s] for s in range(8))
    # the old constructor still works and gets the round-robin map
    legacy = S.Schedule("x", 2, 4, 1, ((), ()))
    assert legacy.stage_to_device == (0, 1, 0, 1)
    with pytest.raises(ValueError, match="entries for 4 stages"):
        S.Schedule("x", 2, 4, 1, ((), ()), (0, 1))
    with pytest.raises(ValueError, match="outside"):
        S.Schedule("x", 2, 2, 1, ((), ()), (0, 2))
    with pytest.raises(ValueError, match="programs for 2 devices"):
        S.Schedule("x", 2, 2, 1, ((),))


def one_device(text: str, stages: int = 1, microbatches: int = 1) -> S.Schedule:
    return S.Schedule("t", 1, stages, microbatches, (program(text),))


def test_validate_accepts_f_b_or_f_i_w_and_nothing_else() -> None:
    one_device("0F0 0I0 0W0").validate()
    one_device("0F0 0B0").validate()
    one_device("0F0 0F1 0I0 0B1 0W0", microbatches=2).validate()  # mixed per microbatch
    for bad, why in [("0F0 0I0", "F I"), ("0F0 0W0 0I0", "F W I"), ("0F0 0B0 0W0", "F B W"),
                     ("0F0 0I0 0B0", "F I B"), ("0I0 0F0 0W0", "I F W"),
                     ("0F0 0I0 0W0 0W0", "F I W W"), ("", "nothing")]:
        with pytest.raises(ValueError, match=why):
            one_device(bad).validate()
    with pytest.raises(ValueError, match="outside"):
        one_device("0F0 0I0 0W0 0F1").validate()
    wrong_device = S.Schedule("t", 2, 2, 1, (program("0F0 1F0 1I0 1W0"), program("0B0")))
    with pytest.raises(ValueError, match="stage 1 lives on 1"):
        wrong_device.validate()


def zero_bubble_builders() -> dict[str, Callable[[int, int], S.Schedule]]:
    return {"zb-h1": S.zb_h1, "zbv": S.zbv, "dualpipev": S.dualpipe_v}


def test_every_zero_bubble_schedule_is_valid_and_deadlock_free() -> None:
    for p, m in itertools.product(range(1, 7), range(1, 14)):
        for name, make in zero_bubble_builders().items():
            if name == "dualpipev" and m < 2 * p:
                with pytest.raises(ValueError, match="at least 2 \\* devices"):
                    make(p, m)
                continue
            schedule = make(p, m)
            assert schedule.name == name
            assert schedule.splits_backward
            schedule.validate()
            for costs in (EQUAL, {"forward_cost": 1.0, "backward_cost": 2.0}):
                assert S.simulate(schedule, **costs).makespan > 0


def test_by_name_knows_the_zero_bubble_schedules() -> None:
    for name, canonical in [("zb-h1", "zb-h1"), ("ZB_H1", "zb-h1"), ("zb1p", "zb-h1"),
                            ("zbv", "zbv"), ("zb-v", "zbv"), ("dualpipev", "dualpipev"),
                            ("DualPipe-V", "dualpipev"), ("dualpipe_v", "dualpipev")]:
        schedule = S.by_name(name, 4, 8)
        assert schedule.name == canonical
        assert schedule.actions == zero_bubble_builders()[canonical](4, 8).actions
    assert set(S.NAMES) == {"gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zbv", "dualpipev"}
    with pytest.raises(ValueError, match="zb-h1, zbv, dualpipev"):
        S.by_name("zb-h3", 4, 8)


# -- the simulator --------------------------------------------------------------------


def test_a_full_backward_costs_input_plus_weight_gradient() -> None:
    for p, m in [(2, 4), (4, 8), (3, 7)]:
        split = S.simulate(S.one_f_one_b(p, m), 1.0, 1.5, weight_cost=0.5)
        assert split.makespan == pytest.approx(S.simulate(S.one_f_one_b(p, m), 1.0, 2.0).makespan)
    single = S.simulate(one_device("0F0 0I0 0W0"), 1.0, 2.0, weight_cost=0.25)
    assert [(str(s.action), s.start, s.end) for s in single.spans] == [
        ("0F0", 0.0, 1.0), ("0I0", 1.0, 3.0), ("0W0", 3.0, 3.25)]
    # by default a W is free, so every result from before split backwards stands
    assert S.simulate(S.zb_h1(4, 8), 1.0, 2.0).makespan == pytest.approx(
        S.simulate(S.zb_h1(4, 8), 1.0, 2.0, weight_cost=0.0).makespan)
    with pytest.raises(ValueError, match=">= 0"):
        S.simulate(S.zb_h1(2, 2), weight_cost=-1.0)


def test_chunk_costs_are_shares_of_a_device_full_stage() -> None:
    for make in (S.zbv, S.dualpipe_v):
        sim = S.simulate(make(4, 8), **EQUAL)
        per_action = {s.action.kind: s.end - s.start for s in sim.spans}
        assert per_action == {"F": 0.5, "I": 0.5, "W": 0.5, **(
            {"B": 1.0} if make is S.dualpipe_v else {})}
        # every device does the same work as in 1F1B: m times F + I + W of its share
        assert sim.ideal == pytest.approx(3 * 8)


def test_dependencies_and_hops() -> None:
    # W waits for its own I only; I of stage 0 waits for I of stage 1 plus the hop
    two = S.Schedule("t", 2, 2, 1, (program("0F0 0I0 0W0"), program("1F0 1I0 1W0")))
    sim = S.simulate(two, 1.0, 1.0, comm_cost=0.5, weight_cost=1.0)
    when = {str(s.action): (s.start, s.end) for s in sim.spans}
    assert when == {"0F0": (0.0, 1.0), "1F0": (1.5, 2.5), "1I0": (2.5, 3.5),
                    "1W0": (3.5, 4.5), "0I0": (4.0, 5.0), "0W0": (5.0, 6.0)}
    # the bottom of the V is one device: no hop between its two stages
    one = S.zbv(1, 4)
    assert S.simulate(one, comm_cost=5.0).makespan == S.simulate(one).makespan
    assert S.simulate(S.zbv(2, 4), comm_cost=1.0).makespan > S.simulate(S.zbv(2, 4)).makespan
    stuck = S.Schedule("t", 2, 2, 1, (program("0F0 0I0 0W0"), program("1I0 1F0 1W0")))
    with pytest.raises(ValueError):
        S.simulate(stuck)


def test_deferred_weight_gradients_hold_their_activations() -> None:
    deferred = one_device("0F0 0I0 0F1 0I1 0F2 0I2 0W0 0W1 0W2", microbatches=3)
    eager = one_device("0F0 0I0 0W0 0F1 0I1 0W1 0F2 0I2 0W2", microbatches=3)
    full = one_device("0F0 0B0 0F1 0B1 0F2 0B2", microbatches=3)
    assert S.simulate(deferred).peak_activations == (3,)
    assert S.simulate(eager).peak_activations == (1,)
    assert S.simulate(full).peak_activations == (1,)


# -- the papers' figures (F = I = W) --------------------------------------------------


@pytest.mark.parametrize(("p", "m"), [(2, 4), (3, 6), (4, 8), (4, 12), (4, 16), (8, 16),
                                      (8, 32)])
def test_bubbles_match_the_zero_bubble_papers(p: int, m: int) -> None:
    """Qi et al. (ICLR 2024), with T_F = T_B = T_W: 1F1B idles 3(p - 1) per device (bubble
    rate (p-1)/m), ZB-H1 a third of that, p - 1 ((p-1)/3m), at 1F1B's peak memory; ZB-V
    keeps every device busy from its first action to its last (the paper's "zero
    bubble"), and what remains is the V's warm-up skew, (p - 1) half-stage forwards."""
    work = 3 * m  # per device: m forwards, input and weight gradients of one unit each
    one = S.simulate(S.one_f_one_b(p, m), 1.0, 2.0)  # a full B is I + W
    zb1 = S.simulate(S.zb_h1(p, m), **EQUAL)
    zbv = S.simulate(S.zbv(p, m), **EQUAL)
    dpv = S.simulate(S.dualpipe_v(p, m), **EQUAL)
    assert one.idle == pytest.approx([3 * (p - 1)] * p)
    assert zb1.idle == pytest.approx([p - 1] * p)
    assert zbv.idle == pytest.approx([(p - 1) / 2] * p)
    assert dpv.idle == pytest.approx([(p - 1) / 2] * p)
    assert [i / work for i in one.idle] == pytest.approx([(p - 1) / m] * p)
    assert [i / work for i in zb1.idle] == pytest.approx([(p - 1) / (3 * m)] * p)
    assert one.makespan == 3 * (m + p - 1)
    assert zb1.makespan == work + p - 1
    # ZB-V: no gap inside any device's span; the last device cannot start any earlier
    for d in range(p):
        spans = [s for s in zbv.spans if s.device == d]
        start, end = min(s.start for s in spans), max(s.end for s in spans)
        assert end - start == pytest.approx(work)
        assert start == pytest.approx(d / 2)
    # memory: ZB-H1 holds 1F1B's peak (its first device's) on every device; ZB-V holds
    # 2p half-stage chunks, the same amount of activations; DualPipeV one chunk more
    assert one.peak_activations == tuple(p - s for s in range(p))
    assert zb1.peak_activations == (p,) * p
    assert zbv.peak_activations == (2 * p,) * p
    assert dpv.peak_activations == (2 * p + 1,) * p


def test_the_issue_s_ratio_for_four_devices_and_eight_microbatches() -> None:
    one = S.simulate(S.one_f_one_b(4, 8), **EQUAL)
    zb1 = S.simulate(S.zb_h1(4, 8), **EQUAL)
    zbv = S.simulate(S.zbv(4, 8), **EQUAL)
    assert (one.makespan, zb1.makespan, zbv.makespan) == (33.0, 27.0, 25.5)
    assert zb1.makespan / one.makespan == pytest.approx(27 / 33)


# -- what the runtime runs as one backward -------------------------------------------


def test_an_i_whose_gradient_stays_on_its_device_runs_with_its_w_as_one_b() -> None:
    merged = S.merge_local_backwards(S.zbv(2, 4))
    # device 1 is the bottom of the V (stages 1 and 2): 2I's gradient goes to stage 1
    # on the same device, which runs after the 2W anyway. 3I's gradient goes to
    # device 1 and 1I's to device 0: those stay split, and so does 2I3, whose W is
    # not next. Stage 0 sends nothing, but its I is free already: left as it is.
    assert merged.table() == (
        "dev0: 0F0 0F1 0F2 3F0 3I0 3W0 3F1 3I1 3W1 0F3 0I0 0W0 3F2 3I2 3W2 0I1 0W1 3F3 "
        "3I3 3W3 0I2 0W2 0I3 0W3\n"
        "dev1: 1F0 2F0 1F1 2F1 2B0 1F2 1I0 1W0 2F2 2B1 1F3 1I1 1W1 2F3 2B2 1I2 2I3 1I3 "
        "1W2 2W3 1W3")
    assert (merged.name, merged.stage_to_device) == ("zbv", S.zbv(2, 4).stage_to_device)
    # on one device every stage's predecessor is local; only back-to-back pairs merge
    one = S.Schedule("t", 1, 2, 2, (program("0F0 1F0 0F1 1F1 1I0 1W0 0I0 0W0 1I1 0I1 "
                                            "1W1 0W1"),))
    assert S.merge_local_backwards(one).actions[0] == program(
        "0F0 1F0 0F1 1F1 1B0 0I0 0W0 1I1 0I1 1W1 0W1")
    for plain in (S.one_f_one_b(4, 8), S.gpipe(3, 5), S.interleaved_1f1b(2, 4, 2)):
        assert S.merge_local_backwards(plain) == plain


MERGE_COSTS = [(1.0, 1.0, 1.0), (1.0, 2.0, 1.0), (0.5, 1.5, 0.25), (2.0, 0.3, 1.7)]


def test_merging_starts_nothing_later_and_keeps_the_makespan() -> None:
    merges = 0
    for p, m in itertools.product(range(1, 6), range(1, 11)):
        for name, make in zero_bubble_builders().items():
            if name == "dualpipev" and m < 2 * p:
                continue
            split = make(p, m)
            merged = S.merge_local_backwards(split)
            merged.validate()
            for d, (before, after) in enumerate(zip(split.actions, merged.actions,
                                                    strict=True)):
                for b in (a for a in after if a.kind == "B" and a not in before):
                    merges += 1
                    assert b.stage > 0 and split.device_of(b.stage - 1) == d, (name, p, m, b)
                    i = before.index(S.Action(b.stage, "I", b.mb))
                    assert before[i + 1] == S.Action(b.stage, "W", b.mb)
            for comm, (f, i, w) in itertools.product((0.0, 0.4), MERGE_COSTS):
                costs = costs_of(split, f, i, w)
                old = S.simulate(split, comm_cost=comm, durations=costs)
                new = S.simulate(merged, comm_cost=comm, durations=costs)
                assert new.makespan == pytest.approx(old.makespan), (name, p, m)
                start = {s.action: s.start for s in old.spans}
                for span in new.spans:
                    a = span.action
                    was = start[S.Action(a.stage, "I", a.mb) if a not in start else a]
                    assert span.start <= was + 1e-9, (name, p, m, a)
                assert max(new.peak_activations) <= max(old.peak_activations)
    assert merges > 100


def test_a_trace_of_the_merged_program_simulates_as_the_schedule_it_ran() -> None:
    split = S.zbv(3, 6)
    merged = S.merge_local_backwards(split)
    costs = costs_of(split, 1.0, 2.0, 0.5)
    measured = {(s.action.stage, s.action.kind, s.action.mb): s.end - s.start
                for s in S.simulate(merged, durations=costs).spans}
    assert any(k == "B" for _, k, _ in measured)
    # the schedule as started (split) with what its merged run measured: each B counts
    # for its I, and its W costs nothing
    replay = S.simulate(split, durations=measured)
    assert replay.makespan == pytest.approx(S.simulate(merged, durations=costs).makespan)


# -- torch pipelining's own orders ------------------------------------------------------


class StandInStage:
    """What torch's schedule constructors read from a pipeline stage to build their
    ``pipeline_order`` (no process group, no module)."""

    def __init__(self, stage_index: int, num_stages: int, group_size: int) -> None:
        self.stage_index = stage_index
        self.num_stages = num_stages
        self.group_size = group_size
        self.group_rank = 0
        self.submod = None
        self.stage_index_to_group_rank: dict[int, int] = {}


def torch_order(cls: Any, p: int, m: int, stages: list[int]) -> Any:
    n = p * len(stages) if cls not in (T.ScheduleZBVZeroBubble, T.ScheduleDualPipeV) else 2 * p
    made = [StandInStage(s, n, p) for s in stages]
    if issubclass(cls, T.PipelineScheduleSingle):
        return cls(made[0], m)
    return cls(made, m)


def flatten(schedule: Any, p: int) -> tuple[tuple[S.Action, ...], ...]:
    """torch's per-rank order, compute actions only, an ``OVERLAP_F_B`` pair written
    out as its sub-actions in order (which is how torch's runtime runs it)."""
    out = []
    for rank in range(p):
        acts = []
        for a in schedule.pipeline_order[rank]:
            if a is None:
                continue
            for sub in a.sub_actions or (a,):
                if sub.computation_type.value in S.KINDS:
                    acts.append(S.Action.from_str(str(sub)))
        out.append(tuple(acts))
    return tuple(out)


SIZES = [(p, m) for p in range(1, 7) for m in range(1, 17)]


def test_zb_h1_is_torch_s_interleaved_zero_bubble_with_one_stage_per_rank() -> None:
    compared = 0
    for p, m in SIZES:
        rounds = max(1, m // p)
        if m % rounds:
            # torch refuses these sizes (it reuses its interleaved rule); we need not
            with pytest.raises(ValueError, match="multiple of the number of rounds"):
                torch_order(T.ScheduleInterleavedZeroBubble, p, m, [0])
            S.simulate(S.zb_h1(p, m))
            continue
        assert flatten(torch_order(T.ScheduleInterleavedZeroBubble, p, m, [0]), p) == \
            S.zb_h1(p, m).actions, (p, m)
        compared += 1
    assert compared > 70


def test_zbv_is_torch_s_zbv_zero_bubble() -> None:
    for p, m in SIZES:
        theirs = torch_order(T.ScheduleZBVZeroBubble, p, m, [0, 2 * p - 1])
        ours = S.zbv(p, m)
        assert flatten(theirs, p) == ours.actions, (p, m)
        assert theirs.stage_index_to_group_rank == dict(enumerate(ours.stage_to_device))


def test_dualpipe_v_is_torch_s_with_overlapped_pairs_written_out() -> None:
    overlapped = 0
    for p, m in SIZES:
        if m < 2 * p:
            with pytest.raises(ValueError):
                torch_order(T.ScheduleDualPipeV, p, m, [0, 2 * p - 1])
            continue
        theirs = torch_order(T.ScheduleDualPipeV, p, m, [0, 2 * p - 1])
        ours = S.dualpipe_v(p, m)
        assert flatten(theirs, p) == ours.actions, (p, m)
        assert theirs.stage_index_to_group_rank == dict(enumerate(ours.stage_to_device))
        # each torch OVERLAP_F_B is (F of one chunk; full B of the other), and ours runs
        # the same two actions back to back at the same place in the program
        for rank in range(p):
            position = 0
            for a in (x for x in theirs.pipeline_order[rank] if x is not None):
                if a.sub_actions is None:
                    position += a.computation_type.value in S.KINDS
                    continue
                f, b = (S.Action.from_str(str(x)) for x in a.sub_actions)
                assert (f.kind, b.kind) == ("F", "B") and f.stage != b.stage
                assert ours.actions[rank][position:position + 2] == (f, b)
                position += 2
                overlapped += 1
    assert overlapped > 100


def test_interleaved_1f1b_is_torch_s() -> None:
    for (p, m), v in itertools.product(SIZES, (1, 2, 3)):
        if m % p:
            continue
        theirs = torch_order(T.ScheduleInterleaved1F1B, p, m, [c * p for c in range(v)])
        assert flatten(theirs, p) == S.interleaved_1f1b(p, m, v).actions, (p, m, v)


def test_1f1b_and_gpipe_against_torch_and_the_known_differences() -> None:
    """Two deliberate differences, both in orders torch only prints and simulates
    (``Schedule1F1B`` and ``ScheduleGPipe`` run their own loops, not ``pipeline_order``):
    torch's 1F1B order numbers the last rank's forwards from 1 (``1..m`` instead of
    ``0..m-1``: its warm-up counter starts at 0 and is incremented before the first
    steady-state forward), and GPipe runs its backwards in reverse microbatch order here,
    in forward order there."""
    for p, m in SIZES:
        if m < p:  # torch's 1F1B refuses fewer microbatches than stages
            continue
        theirs = flatten(torch_order(T.Schedule1F1B, p, m, [0]), p)
        ours = S.one_f_one_b(p, m).actions
        assert theirs[:-1] == ours[:-1], (p, m)
        assert theirs[-1] == tuple(S.Action(a.stage, a.kind, a.mb + (a.kind == "F"))
                                   for a in ours[-1]), (p, m)
    for p, m in SIZES:
        theirs = flatten(torch_order(T.ScheduleGPipe, p, m, [0]), p)
        ours = S.gpipe(p, m).actions
        assert theirs == tuple(tuple(sorted(row, key=lambda a: (a.kind != "F", a.mb)))
                               for row in ours), (p, m)


# -- automatic search -------------------------------------------------------------------


def costs_of(schedule: S.Schedule, f: float, i: float, w: float,
             ) -> dict[tuple[int, str, int], float]:
    per = {"F": f, "I": i, "W": w, "B": i + w}
    return {(s, k, mb): per[k] for s in range(schedule.n_stages) for k in per
            for mb in range(schedule.n_microbatches)}


@pytest.mark.parametrize(("p", "m"), [(2, 4), (3, 7), (4, 8), (4, 16)])
@pytest.mark.parametrize("fiw", [(1.0, 1.0, 1.0), (1.0, 2.0, 1.0), (2.0, 1.0, 1.0),
                                 (1.0, 1.0, 0.3), (1.0, 1.5, 2.0)])
def test_search_never_loses_to_1f1b_within_its_memory(
        p: int, m: int, fiw: tuple[float, float, float]) -> None:
    f, i, w = fiw
    found = S.search(p, m, {"F": f, "I": i, "W": w}, max_activations=p)
    found.validate()
    sim = S.simulate(found, durations=costs_of(found, *fiw))
    base = S.simulate(S.one_f_one_b(p, m), durations=costs_of(found, *fiw))
    assert sim.makespan < base.makespan  # splitting the backward always pays here
    assert max(sim.peak_activations) <= p


COST = st.sampled_from([0.0, 0.1, 0.5, 1.0, 1.7, 3.0])


@settings(max_examples=150, deadline=None)
@given(p=st.integers(1, 5), m=st.integers(1, 10), spare=st.integers(0, 9), f=COST, i=COST,
       w=COST, comm=st.sampled_from([0.0, 0.3]))
def test_search_always_returns_a_runnable_schedule_within_the_memory_limit(
        p: int, m: int, spare: int, f: float, i: float, w: float, comm: float) -> None:
    limit = 1 + spare % (2 * p)
    found = S.search(p, m, {"F": f, "I": i, "W": w}, limit, comm_cost=comm)
    durations = costs_of(found, f, i, w)
    sim = S.simulate(found, comm_cost=comm, durations=durations)  # validates, no deadlock
    assert max(sim.peak_activations) <= limit
    if limit >= min(p, m):  # 1F1B fits
        base = S.simulate(S.one_f_one_b(p, m), comm_cost=comm, durations=durations)
        assert sim.makespan <= base.makespan + 1e-9


def test_search_uses_more_memory_when_allowed() -> None:
    # I twice as slow as F and W: with 2p microbatches per device allowed, the greedy
    # schedule (ZB-H2-like: more warm-up forwards) beats both handcrafted ones
    p, m, fiw = 4, 8, (1.0, 2.0, 1.0)
    found = S.search(p, m, {"F": 1.0, "I": 2.0, "W": 1.0}, 2 * p)
    sim = S.simulate(found, durations=costs_of(found, *fiw))
    zb1 = S.simulate(S.zb_h1(p, m), durations=costs_of(found, *fiw))
    assert found.name == "search"
    assert sim.makespan < zb1.makespan
    assert p < max(sim.peak_activations) <= 2 * p


@pytest.mark.parametrize("limit", [1, 2, 3])
def test_search_respects_a_memory_limit_below_1f1b_s(limit: int) -> None:
    p, m = 4, 8
    found = S.search(p, m, {"F": 1.0, "I": 1.0, "W": 1.0}, limit)
    sim = S.simulate(found, **EQUAL)
    assert max(sim.peak_activations) <= limit
    # 1F1B needs p on its first device; one less, and the split backward makes up for it
    if limit == p - 1:
        assert sim.makespan <= S.simulate(S.one_f_one_b(p, m), **EQUAL).makespan


def test_search_takes_a_trace_s_durations_with_uneven_stages() -> None:
    # the last stage (say, an LM head) is three times as slow as the others
    p, m = 4, 8
    measured = {(s, k, mb): (3.0 if s == p - 1 else 1.0) * (0.5 if k == "W" else 1.0)
                for s in range(p) for k in "FIW" for mb in range(m)}
    found = S.search(p, m, measured)
    sim = S.simulate(found, durations=measured)
    split_1f1b = {(s, "B", mb): measured[s, "I", mb] + measured[s, "W", mb]
                  for s in range(p) for mb in range(m)} | measured
    assert sim.makespan <= S.simulate(S.one_f_one_b(p, m), durations=split_1f1b).makespan
    with pytest.raises(ValueError, match="no I W durations for stage 0"):
        S.search(p, m, {(s, "F", 0): 1.0 for s in range(p)} | {(s, "B", 0): 1.0
                                                               for s in range(p)})
    with pytest.raises(ValueError, match="missing W"):
        S.search(p, m, {"F": 1.0, "I": 1.0})
    with pytest.raises(ValueError, match="max_activations"):
        S.search(p, m, {"F": 1.0, "I": 1.0, "W": 1.0}, 0)


# -- timelines ---------------------------------------------------------------------------


def played(schedule: S.Schedule, **costs: float) -> tuple[S.Simulation, StepTrace]:
    """A step trace with exactly the simulated spans, as a device would record them."""
    sim = S.simulate(schedule, **costs)
    t0 = 1000.0
    spans = tuple(TraceSpan(s.device, s.action.stage, s.action.kind, s.action.mb,
                            t0 + s.start, t0 + s.end) for s in sim.spans)
    return sim, StepTrace(0, "train", t0, t0 + sim.makespan, spans)


def test_step_traces_count_input_and_weight_gradients_as_compute() -> None:
    schedule = S.zb_h1(4, 8)
    sim, step = played(schedule, forward_cost=1.0, backward_cost=1.5, weight_cost=0.5)
    durations = step.durations()
    assert {k for _, k, _ in durations} == {"F", "I", "W"}
    assert len(durations) == 3 * 4 * 8
    assert durations[2, "W", 5] == pytest.approx(0.5)
    assert step.bubble_fraction() == pytest.approx(sim.bubble_fraction)
    per_device = [sum(end - start for d, start, end in step.idle() if d == dev)
                  for dev in range(4)]
    assert per_device == pytest.approx(list(sim.idle))
    # the measured durations replay to the same makespan, and feed the search
    assert S.simulate(schedule, durations=durations).makespan == pytest.approx(sim.makespan)
    found = S.search(4, 8, durations)
    assert S.simulate(found, durations=durations).makespan <= sim.makespan + 1e-9


def test_chrome_export_has_input_and_weight_gradient_events() -> None:
    _, step = played(S.zbv(2, 4), **EQUAL)
    events = Trace([step]).to_chrome()["traceEvents"]
    compute = [e for e in events if e["ph"] == "X" and e.get("cat") in S.KINDS]
    assert {e["cat"] for e in compute} == {"F", "I", "W"}
    assert all(e["tid"] == 0 for e in compute)
    assert {e["name"] for e in compute if e["cat"] == "W"} == {f"W{mb}" for mb in range(4)}
    assert {e["args"]["stage"] for e in compute if e["pid"] == 0} == {0, 3}


def test_png_timeline_draws_input_and_weight_gradients_in_their_own_colours(
        tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from matplotlib import image

    from shardline.models._trace import _COLORS

    def has_colour(pixels: Any, hex_colour: str) -> bool:
        rgb = [int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5)]
        close = abs(pixels[..., :3] - rgb).max(axis=-1) < 2 / 255
        return bool(close.any())

    _, split = played(S.dualpipe_v(2, 4), **EQUAL)
    Trace([split]).to_png(tmp_path / "dpv.png")
    pixels = image.imread(tmp_path / "dpv.png")
    assert len({_COLORS[k] for k in S.KINDS}) == 4
    for kind in S.KINDS:  # DualPipeV runs all four kinds
        assert has_colour(pixels, _COLORS[kind]), kind
    _, whole = played(S.one_f_one_b(2, 4))
    Trace([whole]).to_png(tmp_path / "1f1b.png")
    pixels = image.imread(tmp_path / "1f1b.png")
    assert has_colour(pixels, _COLORS["B"])
    assert not has_colour(pixels, _COLORS["I"]) and not has_colour(pixels, _COLORS["W"])
