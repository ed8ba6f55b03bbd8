"""``sl.Cluster`` and ``shardline node --join``: workers dial the driver, in rank order,
with CURVE; every bad input is refused clearly and changes nothing."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import msgpack
import pytest
import zmq

import shardline as sl
from shardline.actors._join import JOIN_NAME, Member, join
from shardline.transport import KeyPair

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items()
            if k not in ("LOCAL_RANK", "SLURM_LOCALID", "SHARDLINE_LOCAL_RANK",
                         "CUDA_VISIBLE_DEVICES")}
    base["PYTHONPATH"] = os.pathsep.join(p or os.getcwd() for p in sys.path)
    return {**base, **extra}


def worker(address: str, *args: str, **extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "shardline.cli", "node", "--join", address, "--allow", "tests",
         *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(**extra))


@contextmanager
def reaped(*procs: subprocess.Popen[str]) -> Iterator[None]:
    try:
        yield
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=30)


async def exited(*procs: subprocess.Popen[str], timeout: float = 30) -> None:
    """Wait (without blocking the loop: the driver must keep answering) for ``procs``."""
    with anyio.fail_after(timeout):
        while any(p.poll() is None for p in procs):
            await anyio.sleep(0.05)


def finish(proc: subprocess.Popen[str], timeout: float = 30) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


async def test_workers_join_in_rank_order_and_leave_when_it_ends() -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    # Started before the driver listens: they wait for it. Ranks given out of order.
    procs = [worker(address, "--rank", "3"),
             worker(address, "--rank", "1", LOCAL_RANK="1", CUDA_VISIBLE_DEVICES="3,4"),
             worker(address, "--rank", "2")]
    with reaped(*procs):
        async with sl.Cluster(expect=3, listen=address, timeout=30) as cluster:
            assert cluster.address == address
            nodes = cluster.nodes
            assert [n.rank for n in nodes] == [1, 2, 3]
            assert [n.pid for n in nodes] == [procs[1].pid, procs[2].pid, procs[0].pid]
            assert all(n.host == socket.gethostname() for n in nodes)
            assert nodes[0].devices == ["cpu", "cuda:1"] and nodes[0].local_rank == 1
            assert nodes[1].devices == ["cpu"] and nodes[1].local_rank is None
            fragile = await nodes[2].spawn("tests.cluster_fixtures:Fragile")
            assert await fragile.pid() == procs[0].pid
        for proc in procs:
            code, out, err = finish(proc)
            assert code == 0, err
            assert "joined" in out


async def test_plain_connect_learns_devices_and_where_the_node_runs() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "shardline.cli", "node"],
                            stdout=subprocess.PIPE, text=True,
                            env=env(SHARDLINE_LOCAL_RANK="2", CUDA_VISIBLE_DEVICES="0,1"))
    with reaped(proc):
        assert proc.stdout is not None
        address = proc.stdout.readline().split()[2]
        async with sl.Node() as node:
            remote = await node.connect(address)
            assert remote.devices == ["cpu", "cuda:0"]          # local rank 2 of 2 GPUs
            assert (remote.local_rank, remote.pid, remote.rank) == (2, proc.pid, None)
            assert remote.host == socket.gethostname()
        proc.terminate()
    async with sl.LocalCluster(2) as cluster:
        assert [n.local_rank for n in cluster.nodes] == [0, 1]
        assert [n.pid for n in cluster.nodes] == cluster.pids()


async def test_join_timeout_says_how_many_joined_and_from_where() -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    proc = worker(address)
    with reaped(proc):
        with pytest.raises(sl.ClusterTimeout) as caught:
            async with sl.Cluster(expect=2, listen=address, timeout=5):
                pass
        assert isinstance(caught.value, TimeoutError)
        assert isinstance(caught.value, sl.ShardlineError)
        text = str(caught.value)
        assert "1 of 2 expected workers joined" in text and address in text
        assert f"pid {proc.pid}" in text and "missing rank 2" in text
        assert finish(proc)[0] == 0        # the one that joined was told to leave


async def test_a_worker_without_a_driver_gives_up() -> None:
    proc = worker(f"tcp://127.0.0.1:{free_port()}", "--join-timeout", "1")
    with reaped(proc):
        code, _, err = finish(proc)
    assert code == 2 and "no cluster driver answered" in err


async def test_a_worker_exits_when_its_driver_is_killed(tmp_path: Path) -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    ready = tmp_path / "ready"
    driver = subprocess.Popen([sys.executable, "-m", "tests.cluster_fixtures", "drive",
                               address, "1", str(ready)], env=env(), text=True)
    member = worker(address, "--peer-timeout", "1")
    with reaped(driver, member):
        with anyio.fail_after(30):
            while not ready.exists():
                await anyio.sleep(0.05)
        driver.send_signal(signal.SIGKILL)
        code, _, err = finish(member)
    assert code == 1 and "was lost" in err


async def _form(cluster: sl.Cluster, formed: list[sl.Cluster],
                done: anyio.Event) -> None:
    async with cluster:
        formed.append(cluster)
        await done.wait()


async def test_bad_joins_are_refused_and_change_nothing() -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    cluster = sl.Cluster(expect=2, listen=address, timeout=30, connect_timeout=2)
    formed: list[sl.Cluster] = []
    done = anyio.Event()
    async with anyio.create_task_group() as tg, \
            sl.Node(listen="tcp://127.0.0.1:0") as first, \
            sl.Node(listen="tcp://127.0.0.1:0") as second, \
            sl.Node(listen="tcp://127.0.0.1:0") as third:
        tg.start_soon(_form, cluster, formed, done)
        one = await join(first, address, timeout=10)
        assert (one.rank, one.world_size) == (1, 3)

        with pytest.raises(sl.JoinRefused, match="already joined as rank 1"):
            await join(first, address)
        with pytest.raises(sl.JoinRefused, match="rank 1 is already taken"):
            await join(second, address, rank=1)
        with pytest.raises(sl.JoinRefused, match=r"outside 1\.\.2"):
            await join(second, address, rank=7)

        assert second.actors() == []     # a refused join leaves nothing behind
        door = await second.lookup(address, JOIN_NAME)
        member = await second.spawn(Member, anyio.Event(), [])
        good = {"address": second.address, "node": second.node_id}
        for request, args, why in [
                (42, (member,), "expected a map"),
                ({**good, "address": "udp://x:1"}, (member,), "tcp://"),
                ({**good, "node": 7}, (member,), "must be strings"),
                ({**good, "rank": "1"}, (member,), "rank must be an integer"),
                (good, (), "member actor ref"),
                ({**good, "address": f"tcp://127.0.0.1:{free_port()}"}, (member,),
                 "could not reach you"),
                ({**good, "node": "someone-else"}, (member,), "not someone-else")]:
            answer = await door.join(request, *args)
            assert why in answer["refused"] and answer["ended"] is False, (request, answer)
        assert await door.lost(1, 12345, "made up") is False   # not that rank's pid

        _garbage(address)
        assert not formed and len(cluster.nodes) == 1

        two = await join(second, address, timeout=10)
        assert two.rank == 2
        with anyio.fail_after(10):
            while not formed:
                await anyio.sleep(0.01)
        assert [n.node_id for n in cluster.nodes] == [first.node_id, second.node_id]
        with pytest.raises(sl.JoinRefused, match="has all 2 workers"):
            await join(third, address)
        assert len(cluster.nodes) == 2
        done.set()
        with anyio.fail_after(10):
            assert await one.wait_end() == ("the driver ended the cluster", False)


def _garbage(address: str) -> None:
    """Junk at the join port: raw bytes, then well-framed messages that are not msgpack,
    not a request, or of another protocol version."""
    host, port = address.removeprefix("tcp://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        raw.sendall(os.urandom(4096))
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(address)
        for frames in ([b"\xc1\xc1 not msgpack"],
                       [msgpack.packb([1, 2, 3])],
                       [msgpack.packb({"v": 99, "k": "call", "id": 1})],
                       [msgpack.packb({"v": 1, "k": "call", "id": 2, "to": "x", "m": "join",
                                       "a": [], "kw": {}})]):
            sock.send_multipart(frames)
        sock.poll(500)
        sock.close()
    finally:
        ctx.term()


def _keys(tmp_path: Path, *names: str) -> dict[str, KeyPair]:
    return {name: KeyPair.write(tmp_path / name) for name in names}


async def test_curve_strangers_are_refused(tmp_path: Path) -> None:
    keys = _keys(tmp_path, "driver", "workers", "stranger")
    port = free_port()
    base = f"tcp://127.0.0.1:{port}"
    with_key = f"{base};key={keys['driver'].public.decode()}"
    strangers = [worker(with_key, "--keys", str(tmp_path / "stranger"), "--join-timeout", "20"),
                 worker(with_key, "--join-timeout", "20"),          # no key of its own
                 worker(base, "--join-timeout", "20")]              # no CURVE at all
    good = worker(base, "--keys", str(tmp_path / "workers"), "--server-key",
                  str(tmp_path / "driver" / "node.key"))
    with reaped(*strangers, good):
        async with sl.Cluster(expect=1, listen=base, keys=tmp_path / "driver",
                              allow_keys=[tmp_path / "workers" / "node.key"],
                              timeout=30) as cluster:
            assert [n.pid for n in cluster.nodes] == [good.pid]
            await exited(*strangers)   # refused while the driver runs
            assert [n.pid for n in cluster.nodes] == [good.pid]
        assert finish(good)[0] == 0
        for code, _, err in [finish(p) for p in strangers]:
            assert code == 2 and "Unauthorized" in err and "CURVE handshake" in err, err


async def test_a_node_that_is_no_driver(tmp_path: Path) -> None:
    plain = subprocess.Popen([sys.executable, "-m", "shardline.cli", "node"],
                             stdout=subprocess.PIPE, text=True, env=env())
    with reaped(plain):
        assert plain.stdout is not None
        address = plain.stdout.readline().split()[2]
        lost = worker(address)
        with reaped(lost):
            t0 = time.monotonic()
            code, _, err = finish(lost)
        plain.terminate()
    assert code == 2 and "not a cluster driver" in err
    assert time.monotonic() - t0 < 30


