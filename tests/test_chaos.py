"""Chaos (issue 12): training goes on while workers are killed one after another; the
final weights are bitwise those of the run that lost nothing."""

from __future__ import annotations

import os
import random
import signal
from typing import Any

import anyio
import pytest
import torch

import shardline as sl
from shardline.models import LayerSpec, Pipeline

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(240)]

SPEC = LayerSpec("tests.models_fixtures:layers", {"n": 6, "slow": 0.01}, 6)
KWARGS: dict[str, Any] = {"microbatches": 2, "loss_fn": "torch.nn.functional:cross_entropy",
                          "optimizer": ("torch.optim.AdamW", {"lr": 0.01})}
STEPS = 80


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    return [(torch.randn(8, 8, generator=gen), torch.randint(0, 4, (8,), generator=gen))
            for _ in range(STEPS)]


async def test_training_survives_a_worker_killed_every_few_seconds() -> None:
    data = batches()
    async with sl.LocalCluster(2, allow=["tests"]) as cluster:
        pipe = await Pipeline.start(cluster.node, SPEC, placement=cluster.nodes, **KWARGS)
        expected = [await pipe.train_step(x, y) for x, y in data]
        expected_state = await pipe.state_dict()
        await pipe.stop()

    rng = random.Random(1)
    kills: list[int] = []
    async with sl.LocalCluster(2, allow=["tests"], restart=True) as cluster:
        # the restarted workers are the spares
        pipe = await Pipeline.start(cluster.node, SPEC, placement=cluster.nodes,
                                    spares=cluster, **KWARGS)
        losses: list[float] = []

        async def chaos() -> None:
            while len(losses) < STEPS - 3:
                await anyio.sleep(1.5)
                victim = rng.randrange(2)
                kills.append(victim)
                os.kill(cluster.pids()[victim], signal.SIGKILL)
                # one failure at a time: wait until the pipeline has healed
                while len((await pipe.stats())["recoveries"]) < len(kills):
                    await anyio.sleep(0.1)

        async with anyio.create_task_group() as tg:
            tg.start_soon(chaos)
            for x, y in data:
                losses.append(await pipe.train_step(x, y))
            tg.cancel_scope.cancel()
        stats = await pipe.stats()
        state = await pipe.state_dict()
        await pipe.stop()
    assert len(kills) >= 3
    assert len(stats["recoveries"]) == len(kills)
    assert losses == expected
    for key, value in expected_state.items():
        assert torch.equal(state[key], value), key
