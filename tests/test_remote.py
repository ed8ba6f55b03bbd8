"""Actors across processes: real worker subprocesses, real sockets on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import anyio
import numpy as np
import pytest
import torch

import shardline as sl
from tests.actors_fixtures import Counter
from tests.test_codec import ALL_TORCH_DTYPES, random_tensor

pytestmark = pytest.mark.anyio

ALLOW = ["tests"]


async def test_spawn_ask_tell_errors_across_processes() -> None:
    async with sl.LocalCluster(1, allow=ALLOW) as cluster:
        (worker,) = cluster.nodes
        assert isinstance(worker, sl.RemoteNode)
        c = await worker.spawn("tests.actors_fixtures:Counter", 5, name="c")
        assert c.address == worker.address
        assert await c.incr(2) == 7
        assert await c.ask("incr", by=1, timeout=5.0) == 8
        await c.tell("incr", 1)
        assert await c.get() == 9                      # same sender: the tell came first
        with pytest.raises(sl.ActorError) as info:
            await c.fail("remote boom")
        assert info.value.type_name == "ValueError"
        assert info.value.message == "remote boom"
        assert "raise ValueError(message)" in info.value.remote_traceback
        assert await c.get() == 9                      # resumed
        with pytest.raises(sl.MethodNotFound):
            await c.ask("_secret")
        with pytest.raises(sl.ActorNameTaken):
            await worker.spawn("tests.actors_fixtures:Counter", name="c")
        assert await cluster.node.lookup(worker.address, "c") == c
        with pytest.raises(sl.ActorNotFound):
            await worker.lookup("nobody")
        with pytest.raises(sl.Unauthorized, match="'os'"):
            await worker.spawn("os:Counter")
        with pytest.raises(sl.ActorError, match=r"AttributeError"):
            await worker.spawn("tests.actors_fixtures:NoSuchClass")
        with pytest.raises(sl.SerializationError, match=r"args\[0\] \(a set\)"):
            await c.incr({1})
        await c.stop()
        assert (await c.wait_stopped()).reason is sl.StopReason.STOPPED
        with pytest.raises(sl.ActorStopped):  # as in-process (docs/actors.md)
            await c.incr()


async def test_every_dtype_roundtrips_bitwise_across_processes() -> None:
    async with sl.LocalCluster(1, allow=ALLOW) as cluster:
        echo = await cluster.nodes[0].spawn("tests.actors_fixtures:Echo")
        values = [random_tensor(d, (2, 5)) for d in ALL_TORCH_DTYPES]
        out = await echo.echo(values)
        for sent, got in zip(values, out, strict=True):
            assert got.dtype == sent.dtype and got.shape == sent.shape
            assert torch.equal(got.view(torch.uint8), sent.view(torch.uint8)), sent.dtype
        arr = np.arange(10, dtype=np.float64)[::2]
        np.testing.assert_array_equal(await echo.echo(arr), arr)
        args, kwargs = await echo.echo_many((1, 2), x={"y": b"z"})
        assert args == [[1, 2]] and kwargs == {"x": {"y": b"z"}}


async def test_refs_pass_through_a_third_node() -> None:
    async with sl.LocalCluster(2, allow=ALLOW) as cluster:
        a, b = cluster.nodes
        counter = await a.spawn("tests.actors_fixtures:Counter", 40)
        relay = await b.spawn("tests.actors_fixtures:Echo")
        # driver -> b (ref as an argument) -> b calls a directly
        assert await relay.call(counter, "incr", 2) == 42
        assert await relay.echo(counter) == counter    # a ref comes back equal
        assert a.address in await relay.peers()        # b talked to a itself
        # a ref to a driver-side actor works when the driver listens
    async with sl.Node(listen="tcp://127.0.0.1:0") as driver, \
            sl.LocalCluster(1, allow=ALLOW, node=driver) as cluster:
        local = await driver.spawn(Counter, 1)
        remote = await cluster.nodes[0].spawn("tests.actors_fixtures:Echo")
        assert await remote.call(local, "incr", 1) == 2
        assert await remote.echo(local) is local       # resolves to the very same ref


async def test_refs_to_a_non_listening_node_are_refused() -> None:
    async with sl.LocalCluster(1, allow=ALLOW) as cluster:
        local = await cluster.node.spawn(Counter)
        remote = await cluster.nodes[0].spawn("tests.actors_fixtures:Echo")
        with pytest.raises(sl.SerializationError, match="does not listen"):
            await remote.echo(local)


async def test_ordering_across_nodes() -> None:
    async with sl.LocalCluster(1, allow=ALLOW) as cluster:
        rec = await cluster.nodes[0].spawn("tests.actors_fixtures:Recorder", mailbox_size=8)

        async def sender(sid: int) -> None:
            for seq in range(300):
                if seq % 2:
                    await rec.tell("record", sid, seq)
                else:
                    await rec.record(sid, seq)

        async with anyio.create_task_group() as tg:
            for sid in range(4):
                tg.start_soon(sender, sid)
        log = await rec.entries()
    assert len(log) == 1200
    for sid in range(4):
        assert [seq for s, seq in log if s == sid] == list(range(300))


async def test_full_remote_mailbox_pushes_back_on_the_sender() -> None:
    from shardline.actors._remote import TELL_WINDOW

    async with sl.LocalCluster(1, allow=ALLOW) as cluster:
        s = await cluster.nodes[0].spawn("tests.actors_fixtures:Sleeper", mailbox_size=2)
        total = TELL_WINDOW + 100
        for _ in range(total):
            await s.tell("nap", 0.002)
        # tell returned for the last message only after the window had room again, so
        # at most window + mailbox + one running message can still be unhandled
        handled = (await s.stats())["handled"]
        assert handled >= total - TELL_WINDOW - 2 - 1, handled
        peer = cluster.node.peers()[0]
        assert len(peer.pending) <= TELL_WINDOW


async def test_remote_ask_timeout_cancels_the_remote_handler() -> None:
    async with sl.LocalCluster(1, allow=ALLOW) as cluster:
        s = await cluster.nodes[0].spawn("tests.actors_fixtures:Sleeper")
        t0 = time.monotonic()
        with pytest.raises(sl.AskTimeout):
            await s.ask("hang", timeout=0.3)
        assert time.monotonic() - t0 < 0.35
        stats = await s.ask("stats", timeout=5.0)
        assert stats["cancelled"] == 1
        with anyio.move_on_after(0.2):
            await s.hang()
        assert (await s.ask("stats", timeout=5.0))["cancelled"] == 2


async def test_killed_worker_fails_pending_asks_with_node_lost() -> None:
    peer_timeout = 1.0
    async with sl.Node(peer_timeout=peer_timeout) as driver, \
            sl.LocalCluster(1, allow=ALLOW, node=driver,
                            peer_timeout=peer_timeout) as cluster:
        s = await cluster.nodes[0].spawn("tests.actors_fixtures:Sleeper")
        results: list[BaseException] = []

        async def pending() -> None:
            try:
                await s.hang()
            except sl.ShardlineError as exc:
                results.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(pending)
            tg.start_soon(pending)
            await _until(lambda: len(cluster.node.peers()[0].pending) == 2)
            t0 = time.monotonic()
            os.kill(cluster.pids()[0], signal.SIGKILL)
        elapsed = time.monotonic() - t0
        assert len(results) == 2 and all(isinstance(r, sl.NodeLost) for r in results)
        assert elapsed <= peer_timeout + 1.0, elapsed
        info = await s.wait_stopped()
        assert info.reason is sl.StopReason.NODE_LOST
        with pytest.raises(sl.NodeLost):
            await s.stats()


async def test_a_node_that_comes_back_is_reconnected() -> None:
    with anyio.fail_after(30):
        async with sl.Node(peer_timeout=1.0) as driver:
            port = _free_port()
            address = f"tcp://127.0.0.1:{port}"
            first = await _start_worker(address)
            try:
                c = await (await driver.connect(address)).spawn(
                    "tests.actors_fixtures:Counter", name="c")
                assert await c.incr() == 1
                first.kill()
                with pytest.raises(sl.NodeLost):
                    await c.ask("incr", timeout=10.0)
            finally:
                _reap(first)
            second = await _start_worker(address)
            try:
                worker = await driver.connect(address)
                c2 = await worker.spawn("tests.actors_fixtures:Counter", 10, name="c")
                assert await c2.incr() == 11
                with pytest.raises(sl.ShardlineError):
                    await c.incr()  # the old actor died with its process
            finally:
                _reap(second)


async def _until(condition: Callable[[], bool]) -> None:
    while not condition():
        await anyio.sleep(0.01)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _reap(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


async def _start_worker(address: str, *extra: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "shardline.cli", "node", "--listen", address, "--allow",
         "tests", *extra], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = await anyio.to_thread.run_sync(proc.stdout.readline)
    assert line.startswith("shardline node "), line
    return proc
