"""Two worker nodes on two "hosts": network namespaces on a bridge, each with its own
address. A ref to an actor on host A is handed through the driver to host B, which
then calls host A directly. Needs root and iproute2 (CI runs as root)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

import shardline as sl

pytestmark = pytest.mark.anyio

SUBNET = "10.231.77"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2 ('ip')"
    probe = f"slprobe{uuid.uuid4().hex[:6]}"
    try:
        _ip("netns", "add", probe)
    except (subprocess.CalledProcessError, OSError) as exc:
        return f"cannot create network namespaces here: {exc}"
    _ip("netns", "del", probe)
    return None


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def hosts() -> Iterator[list[str]]:
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    tag = uuid.uuid4().hex[:5]
    bridge, names = f"slbr{tag}", [f"slns{tag}{i}" for i in range(2)]
    try:
        _ip("link", "add", bridge, "type", "bridge")
        _ip("addr", "add", f"{SUBNET}.1/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for i, ns in enumerate(names):
            outside, inside = f"slv{tag}{i}", f"slp{tag}{i}"
            _ip("netns", "add", ns)
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            _ip("link", "set", outside, "master", bridge)
            _ip("link", "set", outside, "up")
            _ip("link", "set", inside, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{SUBNET}.{10 + i}/24", "dev", inside)
            _ip("-n", ns, "link", "set", inside, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "route", "add", "default", "via", f"{SUBNET}.1")
        yield names
    finally:
        for ns in names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True, timeout=30)


def _worker(ns: str) -> subprocess.Popen[str]:
    # 0.0.0.0 without keys needs --insecure: these hosts exist only inside this test.
    return subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "shardline.cli", "node",
         "--listen", "tcp://0.0.0.0:0", "--insecure", "--allow", "tests"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(
            p or os.getcwd() for p in sys.path)})


async def test_ref_passed_between_hosts_through_the_driver(hosts: list[str]) -> None:
    procs = [_worker(ns) for ns in hosts]
    try:
        addresses = []
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.startswith("shardline node "), line
            addresses.append(line.split()[2])
        # each advertises its own namespace's address, not 0.0.0.0
        assert addresses[0].startswith(f"tcp://{SUBNET}.10:")
        assert addresses[1].startswith(f"tcp://{SUBNET}.11:")
        async with sl.Node() as driver:
            a = await driver.connect(addresses[0])
            b = await driver.connect(addresses[1])
            counter = await a.spawn("tests.actors_fixtures:Counter", 100)
            relay = await b.spawn("tests.actors_fixtures:Echo")
            assert await relay.call(counter, "incr", 1) == 101   # host B -> host A
            assert addresses[0] in await relay.peers()
            assert await counter.get() == 101
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=20)
            if proc.stdout is not None:
                proc.stdout.close()
