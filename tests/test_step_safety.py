"""What a step must never do: poison the weights with a NaN when asked to check, fail on
a stage without parameters, or leave a device thread complaining at shutdown."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
from torch import nn

import shardline as sl
from shardline.models import Pipeline, PipelineError
from tests import models_fixtures

pytestmark = pytest.mark.anyio

SGD = ("torch.optim.SGD", {"lr": 0.1})


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_check_finite_names_stage_and_microbatch_and_changes_no_weight() -> None:
    async with sl.Node() as node:
        pipe = await Pipeline.start(node, models_fixtures.layers({"n": 6}, 0, 6), stages=3,
                                    microbatches=2, loss_fn=nn.functional.cross_entropy,
                                    optimizer=SGD, check_finite=True)
        before = await pipe.state_dict()
        x = torch.randn(8, 8)
        x[5, 3] = float("nan")   # row 5 is in microbatch 1
        with pytest.raises(PipelineError, match="non-finite activation at stage 0, "
                                                "microbatch 1") as info:
            await pipe.train_step(x, torch.randint(0, 4, (8,)))
        assert info.value.stage == 0
        after = await pipe.state_dict()
        assert all(torch.equal(after[k], v) for k, v in before.items())
        # a clean batch still trains
        assert await pipe.train_step(torch.randn(8, 8), torch.randint(0, 4, (8,))) > 0
        await pipe.stop()


async def test_without_check_finite_non_finite_losses_are_counted() -> None:
    async with sl.Node() as node:
        pipe = await Pipeline.start(node, models_fixtures.layers({"n": 4}, 0, 4), stages=2,
                                    microbatches=2, loss_fn=nn.functional.cross_entropy,
                                    optimizer=SGD)
        x = torch.randn(8, 8)
        x[0, 0] = float("nan")
        await pipe.train_step(x, torch.randint(0, 4, (8,)))
        assert (await pipe.stats())["nonfinite_losses"] == 1
        await pipe.stop()


async def test_a_stage_of_parameter_free_layers_trains() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.ReLU(), nn.Linear(8, 4))
    ref = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.ReLU(), nn.Linear(8, 4))
    ref.load_state_dict(model.state_dict())
    async with sl.Node() as node:
        pipe = await Pipeline.start(node, model, split_points=[1, 3], microbatches=1,
                                    loss_fn=nn.functional.cross_entropy, optimizer=SGD)
        x, y = torch.randn(4, 8), torch.randint(0, 4, (4,))
        loss = await pipe.train_step(x, y)
        await pipe.stop()
    expected = nn.functional.cross_entropy(ref(x), y)
    assert loss == pytest.approx(float(expected.detach()), abs=1e-6)


async def test_no_device_thread_error_at_shutdown_after_a_failed_step() -> None:
    """A device thread still running when its node's ZeroMQ context ends exits quietly
    (it used to raise zmq.ContextTerminated as an unhandled thread exception): any
    unhandled thread exception fails this test."""
    errors: list[Any] = []
    previous = threading.excepthook
    threading.excepthook = errors.append
    try:
        boom = sl.models.LayerSpec("tests.models_fixtures:layers",
                                   {"kind": "boom", "n": 6, "boom_at": 4}, 6)
        async with sl.LocalCluster(2, allow=["tests"]) as cluster:
            pipe = await Pipeline.start(cluster.node, boom, placement=cluster.nodes,
                                        microbatches=1,
                                        loss_fn="torch.nn.functional:cross_entropy",
                                        optimizer=SGD)
            with pytest.raises(PipelineError):
                await pipe.train_step(torch.randn(7, 8), torch.randint(0, 4, (7,)))
        async with sl.Node(listen="tcp://127.0.0.1:0") as node:
            pipe = await Pipeline.start(node, boom, stages=2, microbatches=1,
                                        loss_fn="torch.nn.functional:cross_entropy",
                                        optimizer=SGD)
            with pytest.raises(PipelineError):
                await pipe.train_step(torch.randn(7, 8), torch.randint(0, 4, (7,)))
            # the node closes with the pipeline still up
    finally:
        threading.excepthook = previous
    assert errors == []


async def test_a_batch_too_small_or_a_missing_loss_is_a_value_error_at_the_call() -> None:
    async with sl.Node() as node:
        pipe = await Pipeline.start(node, models_fixtures.layers({"n": 4}, 0, 4), stages=2,
                                    optimizer=SGD)   # default: 8 microbatches, no loss
        with pytest.raises(ValueError, match="needs a loss"):
            await pipe.train_step(torch.randn(16, 8), torch.randint(0, 4, (16,)))
        await pipe.stop()
        pipe = await Pipeline.start(node, models_fixtures.layers({"n": 4}, 0, 4), stages=2,
                                    loss_fn=nn.functional.cross_entropy, optimizer=SGD)
        with pytest.raises(ValueError, match="batch of 4 rows cannot be split into 8"):
            await pipe.train_step(torch.randn(4, 8), torch.randint(0, 4, (4,)))
        await pipe.stop()
