"""Same-host connections move to the node's abstract ipc:// endpoint after the TCP
hello; they stay on TCP when ipc is turned off or the endpoint cannot be reached, and a
killed node leaves nothing behind. Real sockets, real worker processes."""

from __future__ import annotations

import os
import signal

import anyio
import pytest

import shardline as sl
from shardline.actors._node import Node
from tests.actors_fixtures import Counter

pytestmark = pytest.mark.anyio

IPC = "ipc://@shardline-node/"


def _abstract_sockets() -> set[str]:
    """Names of the listening abstract Unix sockets of this network namespace."""
    names = set()
    with open("/proc/net/unix", encoding="ascii", errors="replace") as f:
        next(f)
        for line in f:
            fields = line.split()
            if len(fields) >= 8 and fields[7].startswith("@"):
                names.add(fields[7])
    return names


async def test_a_same_host_connection_moves_to_ipc_and_keeps_working() -> None:
    async with Node("tcp://127.0.0.1:0") as server, Node() as client:
        ref = await server.spawn(Counter, 1, name="c")
        remote = await client.connect(server.address)
        (peer,) = client.peers()
        assert peer.address == server.address          # the identity stays the TCP one
        assert peer.via == f"{IPC}{server.node_id}"
        assert f"@shardline-node/{server.node_id}" in _abstract_sockets()
        c = await remote.lookup("c")
        assert c == ref
        assert await c.incr(2) == 3
        await c.tell("incr", 1)
        assert await c.get() == 4                       # one connection: still in order
        assert await c.ask("incr", timeout=5.0) == 5
        assert remote.node_id == server.node_id


async def test_ipc_off_keeps_tcp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDLINE_IPC", "off")
    async with Node("tcp://127.0.0.1:0") as server, Node() as client:
        await server.spawn(Counter, name="c")
        c = await client.lookup(server.address, "c")
        assert await c.incr() == 1
        (peer,) = client.peers()
        assert peer.via == server.address
        assert not any(name.startswith(f"@shardline-node/{server.node_id}")
                       for name in _abstract_sockets())


async def test_an_unreachable_ipc_endpoint_falls_back_to_tcp() -> None:
    async with Node("tcp://127.0.0.1:0") as server, Node() as client:
        await server.spawn(Counter, name="c")
        # The hello still offers the endpoint, but nothing listens there any more (as
        # for a client in another network namespace).
        endpoint = server._endpoint
        assert endpoint is not None and endpoint._router is not None
        endpoint._router.sock.unbind(f"{IPC}{server.node_id}")
        with anyio.fail_after(10):
            c = await client.lookup(server.address, "c")
        (peer,) = client.peers()
        assert peer.via == server.address
        assert await c.incr() == 1
        assert await c.incr() == 2


@pytest.mark.timeout(120)
async def test_a_killed_node_leaves_no_ipc_socket() -> None:
    async with sl.LocalCluster(1, allow=["tests"]) as cluster:
        (worker,) = cluster.nodes
        c = await worker.spawn("tests.actors_fixtures:Counter", name="c")
        assert await c.incr() == 1
        (peer,) = [p for p in cluster.node.peers() if p.address == worker.address]
        assert peer.via.startswith(IPC)
        name = "@" + peer.via.removeprefix("ipc://@")
        assert name in _abstract_sockets()
        (pid,) = cluster.pids()
        os.kill(pid, signal.SIGKILL)
        with anyio.fail_after(30):
            while name in _abstract_sockets():
                await anyio.sleep(0.05)
        with pytest.raises(sl.NodeLost):
            with anyio.fail_after(30):
                await c.incr()
