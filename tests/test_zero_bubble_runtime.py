"""Zero-bubble schedules run (issue 14): the stage actor splits the backward into the
input gradient (I) and the weight gradient (W), devices hold V-shaped pairs of stages,
and every schedule trains to the unsharded model's weights."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import shardline as sl
from shardline.models import LayerSpec, Pipeline
from tests import models_fixtures
from tests.test_pipeline import OPTIMIZERS, check_equal

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(180)]

CE = "torch.nn.functional:cross_entropy"
NEW = ["zb-h1", "zbv", "dualpipev"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def spec(n: int = 8) -> LayerSpec:
    return LayerSpec("tests.models_fixtures:layers", {"n": n}, n)


@pytest.mark.parametrize("opt_spec", OPTIMIZERS, ids=["sgd", "adamw"])
@pytest.mark.parametrize("schedule", NEW)
@pytest.mark.parametrize(("stages", "m"), [(2, 4), (2, 5), (4, 8)])
async def test_in_process_matches_unsharded(schedule: str, stages: int, m: int,
                                            opt_spec: tuple[str, dict[str, Any]]) -> None:
    if schedule == "dualpipev" and m < 2 * stages:
        with pytest.raises(ValueError):
            sl.models.schedules.by_name(schedule, stages, m)
        return
    n = 16 if stages == 4 else 8
    model = models_fixtures.layers({"n": n}, 0, n)
    ref = models_fixtures.layers({"n": n}, 0, n)
    async with sl.Node() as node:
        pipe = await Pipeline.start(node, model, stages=stages, schedule=schedule,
                                    microbatches=m, loss_fn=nn.functional.cross_entropy,
                                    optimizer=opt_spec)
        try:
            if schedule != "zb-h1":
                assert pipe.schedule.n_stages == 2 * stages
            await check_equal(pipe, ref, opt_spec, m, batch=2 * m)
        finally:
            await pipe.stop()


async def test_across_processes_every_new_schedule_matches_unsharded() -> None:
    async with sl.LocalCluster(2, allow=["tests"]) as cluster:
        for opt_spec in OPTIMIZERS:
            for schedule in NEW:
                pipe = await Pipeline.start(cluster.node, spec(), placement=cluster.nodes,
                                            schedule=schedule, microbatches=4, loss_fn=CE,
                                            optimizer=opt_spec)
                try:
                    await check_equal(pipe, spec().build(0, 8), opt_spec, 4)
                finally:
                    await pipe.stop()


async def test_the_trace_shows_separate_input_and_weight_gradients_where_they_pay() -> None:
    model = models_fixtures.layers({"n": 8}, 0, 8)
    async with sl.Node() as node:
        pipe = await Pipeline.start(node, model, stages=2, schedule="zbv", microbatches=4,
                                    loss_fn=nn.functional.cross_entropy,
                                    optimizer=OPTIMIZERS[0])
        async with pipe.trace() as trace:
            await pipe.train_step(torch.randn(8, 8), torch.randint(0, 4, (8,)))
        await pipe.stop()
    kinds = {(s.device, s.stage, s.kind) for s in trace.steps[0].spans}
    # the V: device 0 holds stages 0 and 3, device 1 stages 1 and 2
    assert {(d, s) for d, s, k in kinds if k == "F"} == {(0, 0), (1, 1), (1, 2), (0, 3)}
    assert {k for _, _, k in kinds} >= {"F", "I", "W", "opt"}
    # what merge_local_backwards runs whole: stage 2's backwards whose W came right
    # after the I (their gradient goes to stage 1, on the same device)
    ran = [(s.stage, s.kind, s.mb) for s in sorted(trace.steps[0].spans,
                                                  key=lambda s: s.start)
           if s.kind in ("B", "I", "W")]
    assert {(s, k) for s, k, _ in ran} == {(0, "I"), (0, "W"), (1, "I"), (1, "W"), (2, "B"),
                                           (2, "I"), (2, "W"), (3, "I"), (3, "W")}
    assert sorted(mb for s, k, mb in ran if (s, k) == (2, "B")) == [0, 1, 2]
    assert [mb for s, k, mb in ran if (s, k) == (2, "I")] == [3]


async def test_split_points_with_two_stages_per_device_is_refused() -> None:
    async with sl.Node() as node:
        with pytest.raises(ValueError, match="stages=N"):
            await Pipeline.start(node, models_fixtures.layers({"n": 8}, 0, 8),
                                 split_points=[4], schedule="zbv")
