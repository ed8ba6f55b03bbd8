"""Data parallel x pipeline parallel (issue 13): R copies of the pipeline, the batch split
across them, every stage's gradients averaged over its copies before the optimizer step.
Weights equal the unsharded model trained on the whole batch, and the replicas stay
bitwise identical."""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest
import torch
from torch import nn

import shardline as sl
from shardline.models import LayerSpec, Pipeline
from tests import models_fixtures

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(180)]

CE = "torch.nn.functional:cross_entropy"
OPTIMIZERS = [("torch.optim.SGD", {"lr": 0.1}), ("torch.optim.AdamW", {"lr": 0.01})]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def spec(n: int = 8) -> LayerSpec:
    return LayerSpec("tests.models_fixtures:layers", {"n": n}, n)


def reference(opt_spec: tuple[str, dict[str, Any]], data: list[Any], parts: int
              ) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The unsharded model on the whole batch: the loss is the mean over ``parts``
    equal microbatches (replicas x microbatches)."""
    model = models_fixtures.layers({"n": 8}, 0, 8)
    path, kwargs = opt_spec
    opt = getattr(torch.optim, path.rsplit(".", 1)[1])(model.parameters(), **kwargs)
    losses = []
    for x, y in data:
        opt.zero_grad()
        idx = torch.tensor_split(torch.arange(x.shape[0]), parts)
        loss = sum(nn.functional.cross_entropy(model(x[i]), y[i]) for i in idx) / parts
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses, model.state_dict()


def batches(n: int, rows: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(5)
    return [(torch.randn(rows, 8, generator=gen), torch.randint(0, 4, (rows,), generator=gen))
            for _ in range(n)]


async def check(pipe: Pipeline, opt_spec: tuple[str, dict[str, Any]], m: int) -> None:
    data = batches(3)
    expected_losses, expected = reference(opt_spec, data, pipe.replicas * m)
    for (x, y), expected_loss in zip(data, expected_losses, strict=True):
        assert await pipe.train_step(x, y) == pytest.approx(expected_loss, abs=1e-5)
        first = await pipe.state_dict(replica=0)
        for r in range(1, pipe.replicas):
            other = await pipe.state_dict(replica=r)
            for key, value in first.items():
                assert torch.equal(other[key], value), (r, key)
    for key, value in expected.items():
        assert (first[key] - value).abs().max() <= 1e-5, key


@pytest.mark.parametrize("opt_spec", OPTIMIZERS, ids=["sgd", "adamw"])
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved-1f1b"])
async def test_two_replicas_in_process_match_the_unsharded_model(
        schedule: str, opt_spec: tuple[str, dict[str, Any]]) -> None:
    model = models_fixtures.layers({"n": 8}, 0, 8)
    async with sl.Node() as node:
        pipe = await Pipeline.start(node, model, stages=2, replicas=2,
                                    placement=[["cpu", "cpu"], ["cpu", "cpu"]],
                                    schedule=schedule, microbatches=4,
                                    loss_fn=nn.functional.cross_entropy, optimizer=opt_spec)
        try:
            await check(pipe, opt_spec, 4)
        finally:
            await pipe.stop()


async def test_replicas_without_a_placement_are_copies_in_this_process() -> None:
    model = models_fixtures.layers({"n": 8}, 0, 8)
    async with sl.Node() as node:
        pipe = await Pipeline.start(node, model, stages=2, replicas=2, microbatches=2,
                                    loss_fn=nn.functional.cross_entropy,
                                    optimizer=OPTIMIZERS[0])
        try:
            assert pipe.replicas == 2
            await check(pipe, OPTIMIZERS[0], 2)
        finally:
            await pipe.stop()


async def test_replicas_across_processes_and_a_checkpoint_that_loads_into_any_r(
        tmp_path: Any) -> None:
    opt_spec = OPTIMIZERS[1]
    async with sl.LocalCluster(4, allow=["tests"]) as cluster:
        a, b, c, d = cluster.nodes
        pipe = await Pipeline.start(cluster.node, spec(), replicas=2,
                                    placement=[[a, b], [c, d]], microbatches=2, loss_fn=CE,
                                    optimizer=opt_spec)
        await check(pipe, opt_spec, 2)
        await pipe.save(str(tmp_path / "ckpt"))
        saved = await pipe.state_dict()
        await pipe.stop()
        # one file set, loaded into a single pipeline and into three replicas
        for replicas, placement in ((1, [a, b]), (3, [[a, b], [c, d], [a, d]])):
            again = await Pipeline.start(cluster.node, spec(), replicas=replicas,
                                         placement=placement, microbatches=2, loss_fn=CE,
                                         optimizer=opt_spec)
            await again.load(str(tmp_path / "ckpt"))
            for r in range(replicas):
                loaded = await again.state_dict(replica=r)
                assert all(torch.equal(loaded[k], v) for k, v in saved.items())
            await again.stop()


@pytest.mark.parametrize("snapshot_every", [0, 1])
async def test_a_lost_replica_stage_is_restored_from_its_sibling(snapshot_every: int) -> None:
    # With snapshots on, the moved stage also takes its sibling's snapshots: the next
    # step pushes the one taken at the last commit from every device.
    opt_spec = OPTIMIZERS[1]
    data = batches(4)
    kwargs: dict[str, Any] = {"replicas": 2, "microbatches": 2, "loss_fn": CE,
                              "optimizer": opt_spec, "snapshot_every": snapshot_every}
    async with sl.LocalCluster(4, allow=["tests"]) as cluster:
        a, b, c, d = cluster.nodes
        pipe = await Pipeline.start(cluster.node, spec(), placement=[[a, b], [c, d]],
                                    **kwargs)
        expected = [await pipe.train_step(x, y) for x, y in data]
        expected_state = await pipe.state_dict()
        await pipe.stop()
    async with sl.Node() as driver, \
            sl.LocalCluster(5, allow=["tests"], node=driver) as cluster:
        a, b, c, d, spare = cluster.nodes
        pipe = await Pipeline.start(driver, spec(), placement=[[a, b], [c, d]],
                                    spares=[spare], **kwargs)
        losses = [await pipe.train_step(x, y) for x, y in data[:2]]
        os.kill(cluster.pids()[3], signal.SIGKILL)   # replica 1, stage 1
        losses += [await pipe.train_step(x, y) for x, y in data[2:]]
        stats = await pipe.stats()
        for r in range(2):
            state = await pipe.state_dict(replica=r)
            assert all(torch.equal(state[k], v) for k, v in expected_state.items())
        await pipe.stop()
    assert losses == expected
    (record,) = stats["recoveries"]
    assert record["from"] == "replica" and record["stages"] == [1]


async def test_the_trace_shows_the_gradient_all_reduce() -> None:
    model = models_fixtures.layers({"n": 8}, 0, 8)
    async with sl.Node() as node:
        pipe = await Pipeline.start(node, model, stages=2, replicas=2,
                                    placement=[["cpu", "cpu"], ["cpu", "cpu"]],
                                    microbatches=2, loss_fn=nn.functional.cross_entropy,
                                    optimizer=OPTIMIZERS[0])
        async with pipe.trace() as trace:
            await pipe.train_step(*batches(1)[0])
        await pipe.stop()
    (step,) = trace.steps
    assert step.n_devices == 4   # replica-major: r0 d0, r0 d1, r1 d0, r1 d1
    assert step.label(3) == "replica 1 device 1"
    reduced = {s.device for s in step.spans if s.kind == "allreduce"}
    assert reduced == {0, 1, 2, 3}
    chrome = trace.to_chrome()
    assert any(e.get("cat") == "allreduce" for e in chrome["traceEvents"])
