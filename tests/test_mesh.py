"""Actor meshes: one actor per node, called together, results in rank order."""

from __future__ import annotations

import pytest

import shardline as sl
from tests.actors_fixtures import Counter

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_spawn_many_across_processes_gathers_in_rank_order() -> None:
    async with sl.LocalCluster(2, allow=["tests"]) as cluster:
        nodes = [*cluster.nodes, cluster.node]   # two workers and this process
        mesh = await cluster.node.spawn_many("tests.actors_fixtures:Counter", nodes, 10)
        assert len(mesh) == 3
        assert await mesh.call("incr", 5) == [15, 15, 15]
        await mesh[1].incr(1)
        assert await mesh.call("get") == [15, 16, 15]
        pids = await (await cluster.node.spawn_many("tests.actors_fixtures:Echo",
                                                    cluster.nodes)).call("pid")
        assert pids == cluster.pids()
        await mesh.stop()


async def test_a_failure_names_the_member() -> None:
    async with sl.Node() as node:
        mesh = await node.spawn_many(Counter, [node, node, node])
        await mesh[2].stop()
        with pytest.raises(sl.MeshError, match=r"'incr' failed on member 2 of 3") as info:
            await mesh.call("incr")
        assert info.value.member == 2
        assert isinstance(info.value.__cause__, sl.ActorStopped)
        with pytest.raises(sl.MeshError, match="member 0") as failed:
            await mesh.call("fail", "bad input")
        assert sorted(failed.value.errors) == [0, 1, 2]
        assert isinstance(failed.value.errors[1], sl.ActorError)


async def test_spawn_many_stops_what_it_made_when_one_spawn_fails() -> None:
    async with sl.LocalCluster(1) as cluster:   # "tests" is not allowed there
        with pytest.raises(sl.MeshError, match="spawn failed on member 1 of 2"):
            await cluster.node.spawn_many("tests.actors_fixtures:Counter",
                                          [cluster.node, cluster.nodes[0]])
        assert cluster.node.actors() == []
