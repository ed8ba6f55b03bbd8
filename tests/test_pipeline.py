"""Pipelines against the unsharded model: gradients, parameters, checkpoints, failures."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
from torch import nn

import shardline as sl
from shardline.models import LayerSpec, Pipeline, PipelineError, gpt, partition
from tests import models_fixtures

pytestmark = pytest.mark.anyio

SCHEDULES = ["gpipe", "1f1b", "interleaved-1f1b"]
OPTIMIZERS = [("torch.optim.SGD", {"lr": 0.1}), ("torch.optim.AdamW", {"lr": 0.01})]
CE = "torch.nn.functional:cross_entropy"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def spec(kind: str = "mlp", n: int = 8, **extra: Any) -> LayerSpec:
    return LayerSpec("tests.models_fixtures:layers", {"kind": kind, "n": n, **extra}, n)


def reference_steps(model: nn.Module, opt_spec: tuple[str, dict[str, Any]], x: torch.Tensor,
                    y: torch.Tensor, m: int, steps: int) -> list[float]:
    """The definition shardline implements: the step's loss is the mean over the m
    microbatches (torch.tensor_split of the batch) of each microbatch's mean loss."""
    path, kwargs = opt_spec
    opt = getattr(torch.optim, path.rsplit(".", 1)[1])(model.parameters(), **kwargs)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        parts = torch.tensor_split(torch.arange(x.shape[0]), m)
        loss = sum(nn.functional.cross_entropy(model(x[p]), y[p]) for p in parts) / m
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


async def check_equal(pipe: Pipeline, ref: nn.Module, opt_spec: tuple[str, dict[str, Any]],
                      m: int, batch: int = 10) -> None:
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(batch, 8, generator=gen)
    y = torch.randint(0, 4, (batch,), generator=gen)
    ours = [await pipe.train_step(x, y) for _ in range(3)]
    theirs = reference_steps(ref, opt_spec, x, y, m, 3)
    assert ours == pytest.approx(theirs, abs=1e-5)
    state = await pipe.state_dict()
    assert state.keys() == ref.state_dict().keys()
    for key, value in ref.state_dict().items():
        assert (state[key] - value).abs().max() <= 1e-5, key
    grads = {f"{n}": p.grad for n, p in ref.named_parameters()}
    assert all(g is not None for g in grads.values())


def plan(schedule: str, stages: int, m: int) -> bool:
    return not (schedule.startswith("interleaved") and m % stages)


@pytest.mark.parametrize("opt_spec", OPTIMIZERS, ids=["sgd", "adamw"])
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("stages", [2, 4])
@pytest.mark.parametrize("m", [1, 4, 3])   # 3 does not divide the batch of 10
async def test_in_process_matches_unsharded(schedule: str, stages: int, m: int,
                                            opt_spec: tuple[str, dict[str, Any]]) -> None:
    if not plan(schedule, stages, m):
        with pytest.raises(ValueError, match="divisible"):
            sl.models.schedules.by_name(schedule, stages, m)
        return
    model = models_fixtures.layers({"n": 8}, 0, 8)
    ref = models_fixtures.layers({"n": 8}, 0, 8)
    async with sl.Node() as node:
        pipe = await Pipeline.start(node, model, stages=stages, schedule=schedule,
                                    microbatches=m, loss_fn=nn.functional.cross_entropy,
                                    optimizer=opt_spec)
        try:
            await check_equal(pipe, ref, opt_spec, m)
        finally:
            await pipe.stop()


async def test_across_processes_matches_unsharded() -> None:
    """Every schedule, 2 and 4 stages, m in 1, 4, 3, SGD and AdamW, on 4 workers."""
    async with sl.LocalCluster(4, allow=["tests"]) as cluster:
        for opt_spec in OPTIMIZERS:
            for schedule in SCHEDULES:
                for stages in (2, 4):
                    for m in (1, 4, 3):
                        if not plan(schedule, stages, m):
                            continue
                        pipe = await Pipeline.start(
                            cluster.node, spec(), placement=cluster.nodes[:stages],
                            schedule=schedule, microbatches=m, loss_fn=CE,
                            optimizer=opt_spec)
                        try:
                            await check_equal(pipe, spec().build(0, 8), opt_spec, m)
                        finally:
                            await pipe.stop()


@pytest.mark.parametrize("where", ["local", "remote"])
async def test_tuple_and_dict_activations_carry_gradients(where: str) -> None:
    opt_spec = OPTIMIZERS[1]
    tree = spec("tree", n=4)

    async def run(node: sl.Node, placement: list[Any]) -> None:
        pipe = await Pipeline.start(node, tree, placement=placement, split_points=[1, 2, 3],
                                    microbatches=2, loss_fn=CE, optimizer=opt_spec)
        try:
            await check_equal(pipe, tree.build(0, 4), opt_spec, 2)
        finally:
            await pipe.stop()

    if where == "local":
        async with sl.Node() as node:
            await run(node, ["cpu"] * 4)
    else:
        async with sl.LocalCluster(2, allow=["tests"]) as cluster:
            await run(cluster.node, [cluster.nodes[0], cluster.nodes[1]] * 2)


async def test_shapes_are_per_message_not_fixed_at_start() -> None:
    cfg = {"blocks": 2, "dim": 32, "heads": 4, "seq": 16, "vocab": 50}
    async with sl.LocalCluster(2, allow=["tests"]) as cluster:
        pipe = await Pipeline.start(cluster.node, gpt.spec(cfg), placement=cluster.nodes,
                                    microbatches=2, loss_fn="shardline.models.gpt:loss",
                                    optimizer=("torch.optim.SGD", {"lr": 0.01}))
        ref = gpt.model(cfg)
        try:
            for batch, seq in ((8, 16), (6, 10), (3, 4), (8, 16)):
                x = torch.randint(0, 50, (batch, seq))
                loss = await pipe.train_step(x, torch.randint(0, 50, (batch, seq)))
                assert loss > 0
            ref.load_state_dict(await pipe.state_dict())
            for batch, seq in ((5, 7), (1, 16), (2, 3)):
                x = torch.randint(0, 50, (batch, seq))
                out = await pipe(x)
                assert out.shape == (batch, seq, 50)
                assert torch.allclose(out, ref(x), atol=1e-5)
        finally:
            await pipe.stop()


async def test_concurrent_inference_calls() -> None:
    model = models_fixtures.layers({"n": 6}, 0, 6)
    ref = models_fixtures.layers({"n": 6}, 0, 6)
    async with sl.Node() as node:
        pipe = await Pipeline.start(node, model, stages=3, microbatches=2)
        xs = [torch.randn(4, 8) for _ in range(10)]
        outs: dict[int, torch.Tensor] = {}

        async def call(i: int) -> None:
            outs[i] = await pipe(xs[i])

        async with anyio.create_task_group() as tg:
            for i in range(10):
                tg.start_soon(call, i)
        with torch.no_grad():
            for i, x in enumerate(xs):
                assert torch.allclose(outs[i], ref(x), atol=1e-6)
        await pipe.stop()


async def test_save_load_round_trip_and_resume(tmp_path: Path) -> None:
    cfg = {"blocks": 2, "dim": 32, "heads": 4, "seq": 16, "vocab": 50}
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 50, (8, 16), generator=gen),
                torch.randint(0, 50, (8, 16), generator=gen)) for _ in range(4)]
    kwargs: dict[str, Any] = {"stages": 2, "microbatches": 2,
                              "loss_fn": "shardline.models.gpt:loss",
                              "optimizer": ("torch.optim.AdamW", {"lr": 1e-3})}
    async with sl.Node() as node:
        pipe = await Pipeline.start(node, gpt.spec(cfg), **kwargs)
        for x, y in batches[:2]:
            await pipe.train_step(x, y)
        await pipe.save(str(tmp_path / "ckpt"))
        saved = await pipe.state_dict()
        uninterrupted = [await pipe.train_step(x, y) for x, y in batches[2:]]
        await pipe.stop()

        # a fresh pipeline, split differently, resumes exactly
        again = await Pipeline.start(node, gpt.spec(cfg), **{**kwargs, "stages": 3})
        await again.load(str(tmp_path / "ckpt"))
        loaded = await again.state_dict()
        assert loaded.keys() == saved.keys()
        for key in saved:
            assert torch.equal(loaded[key], saved[key]), key
        resumed = [await again.train_step(x, y) for x, y in batches[2:]]
        assert resumed == uninterrupted
        await again.stop()
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "model.safetensors", "optimizer.safetensors", "shardline.json"]


async def test_a_failing_stage_surfaces_as_an_error() -> None:
    boom = spec("boom", n=6, boom_at=4)
    async with sl.LocalCluster(2, allow=["tests"]) as cluster:
        pipe = await Pipeline.start(cluster.node, boom, placement=cluster.nodes,
                                    microbatches=1, loss_fn=CE,
                                    optimizer=("torch.optim.SGD", {"lr": 0.1}))
        await pipe.train_step(torch.randn(4, 8), torch.randint(0, 4, (4,)))
        with anyio.fail_after(10), pytest.raises(PipelineError) as info:
            await pipe.train_step(torch.randn(7, 8), torch.randint(0, 4, (7,)))
        assert info.value.stage == 1
        assert "stage exploded" in str(info.value)
        assert isinstance(info.value, sl.ShardlineError)
        # the pipeline still works, and stops cleanly
        assert await pipe.train_step(torch.randn(4, 8), torch.randint(0, 4, (4,))) > 0
        await pipe.stop()


async def test_a_killed_stage_process_surfaces_long_before_peer_timeout() -> None:
    """The cluster that started the worker knows it died and says so at once: the step
    fails naming the stage and how the worker ended, not after peer_timeout."""
    peer_timeout = 30.0
    # layers that take 0.2 s each way, as a GPU kernel would (the benchmark's model)
    nap = LayerSpec("bench.pipeline:nap_layers", {"forward_s": 0.2, "backward_s": 0.2}, 4)
    async with sl.Node(peer_timeout=peer_timeout) as driver, \
            sl.LocalCluster(2, allow=["bench"], node=driver,
                            peer_timeout=peer_timeout) as cluster:
        pipe = await Pipeline.start(driver, nap, placement=cluster.nodes, microbatches=4,
                                    loss_fn="torch.nn.functional:mse_loss",
                                    optimizer=("torch.optim.SGD", {"lr": 0.0}))
        failed: list[BaseException] = []

        async def step() -> None:
            try:
                await pipe.train_step(torch.randn(8, 8), torch.randn(8, 8))
            except PipelineError as exc:
                failed.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(step)
            await anyio.sleep(0.3)
            t0 = time.monotonic()
            os.kill(cluster.pids()[1], signal.SIGKILL)
        assert time.monotonic() - t0 < peer_timeout / 2
        assert failed and isinstance(failed[0].__cause__, sl.NodeLost)
        assert "stage 1" in str(failed[0])
        assert "killed by SIGKILL" in str(failed[0])
        await pipe.stop()


async def test_partition_balances_and_splits() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.ReLU(),
                          nn.Linear(4, 400))
    shards = partition(model, 2)
    assert [len(s) for s in shards] == [4, 1]
    assert shards[0][0] is model[0]                # shares parameters, no copy
    assert [len(s) for s in partition(model, split_points=[1, 3])] == [1, 2, 2]
    assert [len(s) for s in partition(model, 5, balance="layers")] == [1] * 5
    with pytest.raises(ValueError):
        partition(model, stages=2, split_points=[1])
    with pytest.raises(ValueError):
        partition(model, 6)


async def test_remote_stage_refuses_unallowed_imports() -> None:
    async with sl.LocalCluster(1) as cluster:   # "tests" not allowed there
        with pytest.raises(sl.ActorError, match=r"Unauthorized|does not allow"):
            await Pipeline.start(cluster.node, spec(), placement=cluster.nodes,
                                 loss_fn=CE)
        # a peer spawning a stage by hand cannot smuggle an import path past the list,
        # whatever else it passes
        for extra in ({"optimizer": ["os.getcwd", {}]}, {"loss_fn": "os:getcwd"}):
            with pytest.raises(sl.ActorError, match="does not allow importing 'os'"):
                await cluster.nodes[0].spawn(
                    "shardline.models._stage:StageActor", device_index=0, stages=[],
                    n_stages=1, bounds=[], modules=[], **extra)
