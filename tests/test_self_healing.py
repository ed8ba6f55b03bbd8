"""A pipeline that loses a worker keeps training (issue 12): its stages move to a spare,
their state comes back from the in-memory snapshot held on another node, the step runs
again, and the result is bitwise the run that never failed."""

from __future__ import annotations

import os
import signal
from typing import Any

import anyio
import pytest
import torch

import shardline as sl
from shardline.models import LayerSpec, Pipeline, PipelineError

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(180)]

CE = "torch.nn.functional:cross_entropy"
ADAM = ("torch.optim.AdamW", {"lr": 0.01})


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def spec(slow: float = 0.0, n: int = 6) -> LayerSpec:
    return LayerSpec("tests.models_fixtures:layers", {"n": n, "slow": slow}, n)


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(11)
    return [(torch.randn(8, 8, generator=gen), torch.randint(0, 4, (8,), generator=gen))
            for _ in range(n)]


async def uninterrupted(data: list[Any], **kwargs: Any) -> tuple[list[float],
                                                                 dict[str, torch.Tensor]]:
    """The same run on the same kind of workers (same threads per worker, so the same
    floating-point reductions), nothing killed."""
    async with sl.LocalCluster(3, allow=["tests"]) as cluster:
        pipe = await Pipeline.start(cluster.node, spec(), placement=cluster.nodes[:2],
                                    **kwargs)
        try:
            return [await pipe.train_step(x, y) for x, y in data], await pipe.state_dict()
        finally:
            await pipe.stop()


def assert_bitwise(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


@pytest.mark.parametrize("when", ["between_steps", "mid_step"])
async def test_a_lost_stage_moves_to_a_spare_and_training_is_bitwise_unchanged(
        when: str) -> None:
    data = batches(5)
    kwargs: dict[str, Any] = {"microbatches": 2, "loss_fn": CE, "optimizer": ADAM}
    expected_losses, expected = await uninterrupted(data, **kwargs)
    slow = 0.05 if when == "mid_step" else 0.0
    async with sl.Node() as driver, \
            sl.LocalCluster(3, allow=["tests"], node=driver) as cluster:
        pipe = await Pipeline.start(driver, spec(slow), placement=cluster.nodes[:2],
                                    spares=cluster.nodes[2:], snapshot_every=1, **kwargs)
        losses = [await pipe.train_step(x, y) for x, y in data[:2]]
        victim = cluster.pids()[1]
        if when == "between_steps":
            os.kill(victim, signal.SIGKILL)
            losses.append(await pipe.train_step(*data[2]))
        else:
            async with anyio.create_task_group() as tg:
                async def step() -> None:
                    losses.append(await pipe.train_step(*data[2]))

                tg.start_soon(step)
                await anyio.sleep(0.3)  # forwards of 6 slow layers take longer
                os.kill(victim, signal.SIGKILL)
        losses += [await pipe.train_step(x, y) for x, y in data[3:]]
        stats = await pipe.stats()
        state = await pipe.state_dict()
        assert cluster.nodes[2].address in {d.place.node for d in pipe.plan.all_devices()}
        await pipe.stop()
    assert losses == expected_losses
    assert_bitwise(state, expected)
    (record,) = stats["recoveries"]
    assert record["what"] == "node_lost" and record["from"] == "snapshot"
    assert record["moved_to"] == [cluster.nodes[2].address]


async def test_snapshots_every_k_steps_replay_the_steps_since() -> None:
    data = batches(6)
    kwargs: dict[str, Any] = {"microbatches": 2, "loss_fn": CE, "optimizer": ADAM}
    expected_losses, expected = await uninterrupted(data, **kwargs)
    async with sl.Node() as driver, \
            sl.LocalCluster(3, allow=["tests"], node=driver) as cluster:
        pipe = await Pipeline.start(driver, spec(), placement=cluster.nodes[:2],
                                    spares=cluster.nodes[2:], snapshot_every=3, **kwargs)
        losses = [await pipe.train_step(x, y) for x, y in data[:5]]
        os.kill(cluster.pids()[0], signal.SIGKILL)   # stage 0: rolls back to step 3
        losses.append(await pipe.train_step(*data[5]))
        state = await pipe.state_dict()
        await pipe.stop()
    assert losses == expected_losses
    assert_bitwise(state, expected)


async def test_without_a_spare_the_loss_is_a_pipeline_error() -> None:
    async with sl.Node() as driver, \
            sl.LocalCluster(2, allow=["tests"], node=driver) as cluster:
        pipe = await Pipeline.start(driver, spec(), placement=cluster.nodes,
                                    microbatches=2, loss_fn=CE, optimizer=ADAM)
        await pipe.train_step(*batches(1)[0])
        os.kill(cluster.pids()[1], signal.SIGKILL)
        with anyio.fail_after(30), pytest.raises(PipelineError) as info:
            await pipe.train_step(*batches(1)[0])
        assert isinstance(info.value.__cause__, sl.NodeLost)
        await pipe.stop()


async def test_losing_a_stage_and_its_snapshot_holder_together_names_both() -> None:
    async with sl.Node() as driver, \
            sl.LocalCluster(4, allow=["tests"], node=driver) as cluster:
        pipe = await Pipeline.start(driver, spec(), placement=cluster.nodes[:2],
                                    spares=cluster.nodes[2:], microbatches=2, loss_fn=CE,
                                    optimizer=ADAM)
        await pipe.train_step(*batches(1)[0])
        # with two stage nodes, each holds the other's snapshot
        for pid in cluster.pids()[:2]:
            os.kill(pid, signal.SIGKILL)
        with anyio.fail_after(30), pytest.raises(PipelineError) as info:
            await pipe.train_step(*batches(1)[0])
        message = str(info.value)
        assert "both lost" in message
        assert cluster.nodes[0].address in message and cluster.nodes[1].address in message
        await pipe.stop()


async def test_a_stage_that_raises_is_not_retried_and_changes_no_weight() -> None:
    boom = LayerSpec("tests.models_fixtures:layers", {"kind": "boom", "n": 6, "boom_at": 4}, 6)
    async with sl.LocalCluster(3, allow=["tests"]) as cluster:
        pipe = await Pipeline.start(cluster.node, boom, placement=cluster.nodes[:2],
                                    spares=cluster.nodes[2:], microbatches=1, loss_fn=CE,
                                    optimizer=ADAM)
        before = await pipe.state_dict()
        with pytest.raises(PipelineError, match="stage exploded"):
            await pipe.train_step(torch.randn(7, 8), torch.randint(0, 4, (7,)))
        assert_bitwise(await pipe.state_dict(), before)
        assert (await pipe.stats())["recoveries"] == []
        await pipe.stop()


GPT = {"blocks": 2, "dim": 32, "heads": 4, "seq": 64, "vocab": 64, "seed": 3}


async def test_a_generate_stream_survives_the_loss_of_a_stage() -> None:
    """The tokens so far are replayed into the new stage's cache and the stream goes on
    with exactly the tokens it would have produced (a Petals failover, exact)."""
    from shardline.models import gpt

    prompt = [5, 9, 2, 7]
    async with sl.Node() as driver, \
            sl.LocalCluster(3, node=driver) as cluster:
        pipe = await Pipeline.start(driver, gpt.spec(GPT), placement=cluster.nodes[:2],
                                    spares=cluster.nodes[2:])
        expected = [t async for t in pipe.generate(prompt, 24)]
        got: list[int] = []
        async for token in pipe.generate(prompt, 24):
            got.append(token)
            if len(got) == 10:
                os.kill(cluster.pids()[1], signal.SIGKILL)
        stats = await pipe.stats()
        # and plain inference calls work on the healed pipeline
        logits = await pipe(torch.tensor([prompt]))
        assert logits.shape == (1, 4, 64)
        await pipe.stop()
    assert got == expected
    (record,) = stats["recoveries"]
    assert record["from"] == "fresh"


async def test_inference_moves_to_the_other_replica_without_a_failed_call() -> None:
    from shardline.models import gpt

    x = torch.randint(0, 64, (2, 8))
    async with sl.Node() as driver, \
            sl.LocalCluster(4, node=driver) as cluster:
        a, b, c, d = cluster.nodes
        pipe = await Pipeline.start(driver, gpt.spec(GPT), replicas=2,
                                    placement=[[a, b], [c, d]])
        expected = await pipe(x)
        os.kill(cluster.pids()[3], signal.SIGKILL)
        for _ in range(6):   # round robin: half of these went to the dead replica
            assert torch.equal(await pipe(x), expected)
        await pipe.stop()
