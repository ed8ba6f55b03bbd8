"""CURVE, the loopback rule, the command line, and worker reaping."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

import shardline as sl
from shardline.transport import KeyPair
from tests.actors_fixtures import Counter

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shardline.cli", *args],
                          capture_output=True, text=True, timeout=timeout)


async def test_curve_accepts_listed_keys_only(tmp_path: Path) -> None:
    for name in ("server", "good", "bad"):
        out = cli("keys", "generate", str(tmp_path / name))
        assert out.returncode == 0, out.stderr
        assert (tmp_path / name / "node.key").is_file()
        assert (tmp_path / name / "node.key_secret").stat().st_mode & 0o077 == 0
    good = KeyPair.load(tmp_path / "good")
    async with sl.Node(listen="tcp://127.0.0.1:0", keys=tmp_path / "server",
                       allow_keys=[tmp_path / "good" / "node.key"], allow=["tests"]) as server:
        assert ";key=" in server.address
        await server.spawn(Counter, 7, name="c")
        base = server.address.partition(";")[0]

        async with sl.Node(keys=tmp_path / "good") as client:
            c = await client.lookup(server.address, "c")
            assert await c.incr() == 8
            assert good.public.decode() in server.allow_keys
        for kwargs, address in (({}, base),                                # no CURVE at all
                                ({}, server.address),                      # throwaway key
                                ({"keys": tmp_path / "bad"}, server.address)):  # unlisted
            async with sl.Node(**kwargs) as client:  # type: ignore[arg-type]
                with anyio.fail_after(10), pytest.raises(sl.Unauthorized):
                    await client.connect(address, timeout=5.0)
        async with sl.Node(keys=tmp_path / "good") as client:  # still serving
            assert await (await client.lookup(server.address, "c")).incr() == 9


async def test_allow_keys_from_a_text_file(tmp_path: Path) -> None:
    pair = KeyPair.write(tmp_path / "client")
    listing = tmp_path / "allowed.txt"
    listing.write_text(f"# team keys\n{pair.public.decode()}\n")
    node = sl.Node(listen="tcp://127.0.0.1:0", keys=KeyPair.generate(), allow_keys=[listing])
    assert pair.public.decode() in node.allow_keys
    with pytest.raises(ValueError, match="Z85"):
        sl.Node(allow_keys=["not-a-key"])


async def test_non_loopback_needs_keys_or_insecure() -> None:
    with pytest.raises(sl.Unauthorized, match="insecure"):
        async with sl.Node(listen="tcp://0.0.0.0:0"):
            pass
    async with sl.Node(listen="tcp://0.0.0.0:0", insecure=True) as node:
        host = node.address.removeprefix("tcp://").rpartition(":")[0]
        assert host not in ("0.0.0.0", "")         # advertises a reachable address
    async with sl.Node(listen="tcp://0.0.0.0:0", insecure=True,
                       advertise="tcp://127.0.0.1:0") as node:
        assert node.address.startswith("tcp://127.0.0.1:")
        assert not node.address.endswith(":0")
        async with sl.Node() as client:
            await client.connect(node.address)


def test_cli_node_reports_bad_addresses() -> None:
    out = cli("node", "--listen", "tcp://127.0.0.1:notaport")
    assert out.returncode != 0 and "port" in out.stderr
    out = cli("node", "--listen", "udp://127.0.0.1:1")
    assert out.returncode != 0 and "tcp://" in out.stderr
    with __import__("socket").socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = cli("node", "--listen", f"tcp://127.0.0.1:{port}")
    assert out.returncode != 0 and "cannot listen" in out.stderr
    assert "Traceback" not in out.stderr


def test_cli_node_stops_gracefully_on_sigterm_and_sigint() -> None:
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        proc = subprocess.Popen([sys.executable, "-m", "shardline.cli", "node"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("shardline node tcp://127.0.0.1:")
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(
        f"/proc/{pid}/status").read_text().lower()


async def test_local_cluster_reaps_workers_when_the_body_raises() -> None:
    pids: list[int] = []
    with pytest.raises(KeyError):
        async with sl.LocalCluster(2, allow=["tests"]) as cluster:
            pids = cluster.pids()
            assert len(pids) == 2 and all(_alive(p) for p in pids)
            raise KeyError("body failed")
    assert pids and not any(_alive(p) for p in pids)


async def test_local_cluster_stops_worker_actors_gracefully(tmp_path: Path) -> None:
    marker = tmp_path / "stopped"
    async with sl.LocalCluster(1, allow=["tests"]) as cluster:
        await cluster.nodes[0].spawn("tests.actors_fixtures:Tidy", str(marker))
    assert marker.read_text() == "on_stop ran"


async def test_cli_node_with_keys_and_allow_keys_file(tmp_path: Path) -> None:
    assert cli("keys", "generate", str(tmp_path / "server")).returncode == 0
    client = KeyPair.write(tmp_path / "client")
    listing = tmp_path / "allowed.txt"
    listing.write_text(client.public.decode() + "\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "shardline.cli", "node", "--keys", str(tmp_path / "server"),
         "--allow-keys", str(listing), "--allow", "tests"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().split()[2]
        assert ";key=" in address
        async with sl.Node(keys=client) as node:
            c = await (await node.connect(address)).spawn("tests.actors_fixtures:Counter", 1)
            assert await c.incr() == 2
        async with sl.Node() as stranger:
            with pytest.raises(sl.Unauthorized):
                await stranger.connect(address, timeout=5.0)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        if proc.stdout is not None:
            proc.stdout.close()


def test_workers_exit_when_the_driver_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "driver.py"
    script.write_text(
        "import os, signal, shardline as sl\n"
        "async def main():\n"
        "    async with sl.LocalCluster(2) as c:\n"
        "        print(' '.join(map(str, c.pids())), flush=True)\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "sl.run(main())\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=60)
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 2, out.stderr
    deadline = time.monotonic() + 15
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids)
