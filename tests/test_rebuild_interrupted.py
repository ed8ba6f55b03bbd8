"""A rebuild that loses another node half way (issue 12's chaos run that hung): it is
undone as a whole and the pipeline heals again, with every node lost by then; no call
hangs and none fails.

The hang: the rebuild had spawned the new copy of a stage and failed before linking its
neighbour to it; the neighbour kept sending its outputs to the dead stage's address,
the new stage waited for them forever, and so did every call, and the next rebuild,
which waits for the calls in flight."""

from __future__ import annotations

import os
import signal
from typing import Any

import anyio
import pytest
import torch

import shardline as sl
from shardline.models import Pipeline, gpt

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(180)]

GPT = {"blocks": 2, "dim": 32, "heads": 4, "seq": 64, "vocab": 64, "seed": 3}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class KillingOnce:
    """Hands back restarted workers as the cluster does, but the first time it is
    asked, it kills worker ``victim`` first: the rebuild that asked then loses that
    node in its middle (its actors are asked for their link addresses next)."""

    def __init__(self, cluster: sl.LocalCluster, victim: int) -> None:
        self.cluster = cluster
        self.victim = victim
        self.killed: int | None = None

    async def replacement(self, old: sl.RemoteNode, *, timeout: float = 60.0
                          ) -> sl.RemoteNode:
        node = await self.cluster.replacement(old, timeout=timeout)
        if self.killed is None:
            self.killed = self.cluster.pids()[self.victim]
            os.kill(self.killed, signal.SIGKILL)
        return node


async def test_a_node_lost_during_a_rebuild_undoes_it_and_the_next_one_heals_both() -> None:
    x = torch.randint(0, 64, (2, 8))
    async with sl.Node() as driver, \
            sl.LocalCluster(4, node=driver, restart=True) as cluster:
        a, b, c, d = cluster.nodes
        chaos = KillingOnce(cluster, victim=0)  # worker a: stage 0 of replica 0
        pipe = await Pipeline.start(driver, gpt.spec(GPT), replicas=2,
                                    placement=[[a, b], [c, d]], spares=chaos)
        try:
            expected = await pipe(x)
            # stage 1 of replica 1: its rebuild loses worker a after the new copy of
            # stage 1 exists and before stage 0 of replica 1 is linked to it
            os.kill(cluster.pids()[3], signal.SIGKILL)
            with anyio.fail_after(120):  # a bound against the hang, not a timing target
                outputs: list[Any] = [await pipe(x) for _ in range(6)]
            assert chaos.killed is not None
            assert all(torch.equal(out, expected) for out in outputs)
            recoveries = (await pipe.stats())["recoveries"]
            # the interrupted rebuild left no record; the one that finished moved both
            lost = {address for record in recoveries for address in record["lost"]}
            assert {a.address, d.address} <= lost, recoveries
            assert {dev.place.node for dev in pipe.plan.all_devices()}.isdisjoint(
                {a.address, d.address})
            # both copies of both stages answer: round robin reaches each replica
            for _ in range(4):
                assert torch.equal(await pipe(x), expected)
        finally:
            await pipe.stop()
