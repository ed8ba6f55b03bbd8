"""Regressions from an adversarial pass over wave 2 (issues 11-15): shared memory
between processes of one host, and self-healing with replicas. Real worker processes,
real sockets, ``kill -9``."""

from __future__ import annotations

import gc
import os
import signal
import time
from typing import Any

import anyio
import msgpack
import numpy as np
import pytest
import torch
import zmq

import shardline as sl
from shardline.models import LayerSpec, Pipeline
from shardline.transport._codec import EXT_TENSOR, Codec
from shardline.transport._exchange import exchange

pytestmark = pytest.mark.anyio

MIB = 1 << 20


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Keeper(sl.Actor):
    """Holds what it is sent and says what it holds (worker side)."""

    def __init__(self) -> None:
        self.held: list[torch.Tensor] = []

    def keep(self, t: torch.Tensor) -> float:
        self.held.append(t)
        return float(t.double().sum())

    def check(self, t: torch.Tensor) -> float:
        return float(t.double().sum())

    def held_sums(self) -> list[float]:
        return [float(t.double().sum()) for t in self.held]

    def echo(self, value: Any) -> Any:
        return value


async def _eventually(check: Any, timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not check():
            gc.collect()
            exchange().poll()
            await anyio.sleep(0.02)


# -- shared memory --------------------------------------------------------------------------

async def test_a_refused_shared_memory_buffer_goes_back_to_its_lender() -> None:
    """A buffer over the receiver's frame limit is refused; the segment it was lent in
    must not stay lent for the rest of the connection (it leaked one per message)."""
    async with sl.LocalCluster(1, allow=["tests"],
                               node_args=["--max-frame-size", str(2 * MIB)]) as cluster:
        keeper = await cluster.nodes[0].spawn("tests.test_attack_wave2:Keeper")
        (peer,) = cluster.node.peers()
        link = peer.shm
        assert link is not None
        for _ in range(3):
            with pytest.raises(sl.ProtocolError, match="over the frame limit"):
                await keeper.check(torch.ones(MIB))   # 4 MiB
        assert await keeper.check(torch.ones(8)) == 8.0  # the node is fine
        await _eventually(lambda: not link.lent)


def test_a_message_that_fails_before_its_descriptor_gives_the_segment_back() -> None:
    """Decoding stops at the first bad value; segments named after it were never viewed
    and must be released all the same."""
    ex = exchange()
    info = ex.hello_info()
    assert info is not None
    link = ex.link_to(info)   # this process lends to itself: both ends are here
    assert link is not None
    codec = Codec()
    frames = codec.encode({"x": np.ones(MIB, dtype=np.float32)}, link=link)
    lent = {ident for _, ident in frames.placed}
    assert lent and lent <= link.lent
    good = msgpack.unpackb(frames[0], ext_hook=msgpack.ExtType)["x"]
    header = msgpack.packb({"bad": msgpack.ExtType(77, b""), "x": good})
    with pytest.raises(sl.ProtocolError, match="unknown ext type 77"):
        codec.decode(header, [])
    deadline = time.monotonic() + 10
    while lent & link.lent and time.monotonic() < deadline:
        ex.poll()
        time.sleep(0.01)
    assert not lent & link.lent


async def test_a_peer_cannot_name_another_process_segments() -> None:
    """A TCP client (no shared memory of its own) names a segment this process lent the
    worker: it used to read that memory back, and its view's release let this process
    reuse the segment under the worker's own tensor (silent corruption)."""
    async with sl.LocalCluster(1, allow=["tests"]) as cluster:
        keeper = await cluster.nodes[0].spawn("tests.test_attack_wave2:Keeper")
        assert await keeper.keep(torch.full((MIB,), 7.0)) == 7.0 * MIB
        (peer,) = cluster.node.peers()
        assert peer.shm is not None
        (seg,) = peer.shm.lent
        ctx = zmq.Context()
        try:
            sock = ctx.socket(zmq.DEALER)
            sock.linger = 0
            sock.connect(cluster.nodes[0].address)
            stolen = msgpack.ExtType(EXT_TENSOR, msgpack.packb(
                ["float32", [4], [exchange().proc, seg, 0, 16]]))
            sock.send(msgpack.packb({"v": 1, "k": "call", "id": 1, "to": keeper.actor_id,
                                     "m": "echo", "a": [stolen], "kw": {}}))
            assert await anyio.to_thread.run_sync(sock.poll, 10_000)
            answer = msgpack.unpackb(sock.recv_multipart()[0], strict_map_key=False)
            sock.close()
        finally:
            ctx.term()
        assert answer["k"] == "error" and answer["e"]["t"] == "ProtocolError", answer
        assert "did not offer shared memory" in answer["e"]["m"]
        for _ in range(5):
            exchange().poll()
            await anyio.sleep(0.02)
        assert seg in peer.shm.lent   # still the worker's
        await keeper.check(torch.full((MIB,), 1.0))   # would have reused the segment
        assert await keeper.held_sums() == [7.0 * MIB]


async def test_a_shared_tensor_its_sender_dropped_still_arrives() -> None:
    """A reply holding a tensor from ``shared_empty`` that the actor keeps no reference
    to: its segment used to be retired (and forgotten by the receiver) before the reply
    was read, so about half such replies failed with ProtocolError ("unknown here").
    That is what a sibling's ``export_state`` is during a recovery."""
    async with sl.LocalCluster(1, allow=["tests"]) as cluster:
        lender = await cluster.nodes[0].spawn("tests.test_attack_wave2:Lender")
        for _ in range(50):
            got = await lender.fresh(1000)
            assert float(got.sum()) == 1000.0
            del got
        # Once released, the worker's segments are retired: nothing stays lent.
        probe = await cluster.nodes[0].spawn("tests.shm_fixtures:Probe")

        async def settled() -> bool:
            stats = await probe.statistics()
            return bool(stats["segments"] <= 1)

        with anyio.fail_after(10):
            while not await settled():
                gc.collect()
                exchange().poll()
                await anyio.sleep(0.05)


# -- self-healing with replicas ----------------------------------------------------------

CE = "torch.nn.functional:cross_entropy"
ADAM = ("torch.optim.AdamW", {"lr": 0.01})


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(11)
    return [(torch.randn(8, 8, generator=gen), torch.randint(0, 4, (8,), generator=gen))
            for _ in range(n)]


@pytest.mark.timeout(240)
async def test_replicas_with_snapshots_recover_from_a_lost_stage_and_go_on() -> None:
    data = _batches(4)
    spec = LayerSpec("tests.models_fixtures:layers", {"n": 6, "slow": 0.0}, 6)
    kwargs: dict[str, Any] = {"replicas": 2, "microbatches": 2, "loss_fn": CE,
                              "optimizer": ADAM, "snapshot_every": 1}
    async with sl.Node() as driver, \
            sl.LocalCluster(5, allow=["tests"], node=driver) as cluster:
        a, b, c, d, spare = cluster.nodes
        pipe = await Pipeline.start(driver, spec, placement=[[a, b], [c, d]],
                                    spares=[spare], **kwargs)
        try:
            await pipe.train_step(*data[0])
            await pipe.train_step(*data[1])
            os.kill(cluster.pids()[3], signal.SIGKILL)   # replica 1, stage 1
            with anyio.fail_after(120):
                for x, y in data[2:]:
                    await pipe.train_step(x, y)
            first, second = await pipe.state_dict(replica=0), await pipe.state_dict(replica=1)
            assert all(torch.equal(first[k], second[k]) for k in first)
        finally:
            await pipe.stop()


class Lender(sl.Actor):
    """Returns tensors that live in shared memory of its own and keeps none of them."""

    def fresh(self, n: int) -> torch.Tensor:
        from shardline.tensors import shared_empty

        return shared_empty(n).fill_(1.0)
