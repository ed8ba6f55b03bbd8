"""Step traces, the simulator fed with measured durations, and the device links that
carry activations between stage processes."""

from __future__ import annotations

import json
from pathlib import Path

import msgpack
import pytest
import torch
import zmq

import shardline as sl
from shardline.models import LayerSpec, Pipeline, schedules
from shardline.transport import KeyPair
from tests.test_pipeline import CE, OPTIMIZERS, check_equal, spec

pytestmark = pytest.mark.anyio

SGD = ("torch.optim.SGD", {"lr": 0.1})


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(n)
    return torch.randn(n, 8, generator=gen), torch.randint(0, 4, (n,), generator=gen)


async def test_trace_block_records_every_operation_of_its_steps(tmp_path: Path) -> None:
    x, y = batch()
    async with sl.Node() as node:
        pipe = await Pipeline.start(node, spec(), stages=2, schedule="1f1b", microbatches=4,
                                    loss_fn=CE, optimizer=SGD)
        await pipe.train_step(x, y)  # before the block: not recorded
        async with pipe.trace() as trace:
            await pipe.train_step(x, y)
        await pipe.train_step(x, y)  # after it: not recorded either
        assert (await pipe.timeline()).steps == []
        await pipe.stop()
    assert len(trace.steps) == 1
    step = trace.steps[0]
    assert step.what == "train"
    ops = {(s.stage, s.kind, s.mb) for s in step.spans if s.kind in ("F", "B")}
    assert ops == {(s, k, mb) for s in (0, 1) for k in "FB" for mb in range(4)}
    # inputs that came from the other stage, and outputs sent to it
    assert {(s.stage, s.mb) for s in step.spans if s.kind == "recv"} == \
        {(s, mb) for s in (0, 1) for mb in range(4)}
    assert len([s for s in step.spans if s.kind == "send"]) == 8
    assert {s.device for s in step.spans if s.kind == "opt"} == {0, 1}
    for s in step.spans:
        assert step.start - 0.01 <= s.start <= s.end <= step.end + 0.01, s
    # the same operations with zero overhead can only be faster than the real step
    ideal = schedules.simulate(schedules.one_f_one_b(2, 4), durations=step.durations())
    assert 0 < ideal.makespan <= step.end - step.start
    assert 0.0 <= step.bubble_fraction() < 1.0

    doc = trace.to_chrome(tmp_path / "trace.json")
    loaded = json.loads((tmp_path / "trace.json").read_text())
    assert loaded == json.loads(json.dumps(doc))
    events = loaded["traceEvents"]
    for event in events:
        assert {"name", "ph", "pid", "tid"} <= event.keys()
        if event["ph"] == "X":
            assert event["ts"] >= 0 and event["dur"] >= 0
    idle = [e for e in events if e["ph"] == "X" and e["cat"] == "idle"]
    assert {e["pid"] for e in idle} == {0, 1}  # the bubble, as spans of its own
    busy = sum(s.end - s.start for s in step.spans if s.kind in ("F", "B", "opt"))
    gaps = sum(end - start for _, start, end in step.idle())
    assert abs(busy + gaps - 2 * (step.end - step.start)) < 1e-3
    names = {e["name"] for e in events if e["ph"] == "X"}
    assert {f"{k}{mb}" for k in "FB" for mb in range(4)} <= names
    assert {e["args"]["name"] for e in events if e["ph"] == "M"} == \
        {"device 0", "device 1", "scheduler"}


async def test_trace_true_records_every_step_across_processes() -> None:
    x, y = batch()
    async with sl.LocalCluster(2, allow=["tests"]) as cluster:
        pipe = await Pipeline.start(cluster.node, spec(), placement=cluster.nodes,
                                    schedule="gpipe", microbatches=2, loss_fn=CE,
                                    optimizer=SGD, trace=True)
        await pipe.train_step(x, y)
        async with pipe.trace() as inside:  # a block does not turn the recording off
            await pipe(x)
        await pipe.train_step(x, y)
        trace = await pipe.timeline()
        await pipe.stop()
    assert [s.what for s in inside.steps] == ["infer"]
    assert [s.what for s in trace.steps] == ["train", "train"]  # the block took its own
    kinds = {(s.device, s.kind) for s in inside.steps[0].spans}
    assert kinds == {(0, "F"), (0, "send"), (1, "recv"), (1, "F")}
    # the workers' clocks and the driver's agree on one host
    for step in (*inside.steps, *trace.steps):
        for s in step.spans:
            assert step.start - 0.01 <= s.start <= step.end + 0.01


def test_simulate_with_measured_durations() -> None:
    schedule = schedules.gpipe(2, 2)
    nominal = schedules.simulate(schedule, 1.0, 2.0)
    same = {(a.stage, a.kind, a.mb): 1.0 if a.kind == "F" else 2.0
            for acts in schedule.actions for a in acts}
    assert schedules.simulate(schedule, durations=same).makespan == nominal.makespan
    slower = {**same, (1, "F", 1): 4.0}  # one slow forward on the last stage
    assert schedules.simulate(schedule, durations=slower).makespan == nominal.makespan + 3.0


async def test_a_stage_link_drops_garbage_and_strangers() -> None:
    ref = spec().build(0, 8)
    async with sl.LocalCluster(2, allow=["tests"]) as cluster:
        pipe = await Pipeline.start(cluster.node, spec(), placement=cluster.nodes,
                                    microbatches=3, loss_fn=CE, optimizer=OPTIMIZERS[0])
        address = await pipe.devices[1].link_address()
        ctx = zmq.Context()
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(address)
        try:
            for frames in ([b"\xc1"],                                     # not msgpack
                           [msgpack.packb([1, 2, 3])],                    # not a map
                           [msgpack.packb({"t": "nope", "s": 0, "k": "F", "st": 1, "mb": 0,
                                           "v": 1})],                     # other pipeline
                           [msgpack.packb({"t": "x"}), b"extra"],         # missing fields
                           [msgpack.packb({"v": msgpack.ExtType(2, b"\x01")})]):  # bad ext
                push.send_multipart(frames)
            # the pipeline, and the same numbers as the unsharded model, still
            await check_equal(pipe, ref, OPTIMIZERS[0], 3)
        finally:
            push.close()
            ctx.term()
            await pipe.stop()


async def test_stage_links_use_curve_between_curve_nodes(tmp_path: Path) -> None:
    pair = KeyPair.write(tmp_path / "keys")
    async with sl.Node(keys=pair) as driver, \
            sl.LocalCluster(2, allow=["tests"], node=driver,
                            node_args=["--keys", str(tmp_path / "keys")]) as cluster:
        pipe = await Pipeline.start(driver, spec(), placement=cluster.nodes, microbatches=3,
                                    loss_fn=CE, optimizer=OPTIMIZERS[0])
        address = await pipe.devices[1].link_address()
        assert ";key=" in address
        try:
            await check_equal(pipe, spec().build(0, 8), OPTIMIZERS[0], 3)
        finally:
            await pipe.stop()


async def test_nap_layers_take_their_time_off_the_loop() -> None:
    """The benchmark's sleeping layers: the recorded forward lasts what it sleeps."""
    nap = LayerSpec("bench.pipeline:nap_layers", {"forward_s": 0.02, "backward_s": 0.04}, 2)
    async with sl.Node() as node:
        pipe = await Pipeline.start(node, nap, stages=2, microbatches=2,
                                    loss_fn="torch.nn.functional:mse_loss",
                                    optimizer=("torch.optim.SGD", {"lr": 0.0}), trace=True)
        await pipe.train_step(torch.randn(4, 4), torch.randn(4, 4))
        step = (await pipe.timeline()).steps[0]
        await pipe.stop()
    durations = step.durations()
    assert all(d >= 0.02 for (_, kind, _), d in durations.items() if kind == "F")
    assert all(d >= 0.04 for (_, kind, _), d in durations.items() if kind == "B")
