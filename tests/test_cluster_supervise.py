"""A parent that watches its workers: deaths named by cause at once, restarts, OOM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

import shardline as sl
from shardline.actors._supervise import OomWitness, exit_cause

pytestmark = pytest.mark.anyio

FRAGILE = "tests.cluster_fixtures:Fragile"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_exit_causes_in_words() -> None:
    assert exit_cause(0) == "exited with code 0"
    assert exit_cause(3) == "exited with code 3"
    assert exit_cause(-signal.SIGKILL) == "killed by SIGKILL"
    assert exit_cause(-signal.SIGSEGV) == "killed by SIGSEGV"
    assert exit_cause(-signal.SIGTERM, oom="ignored: not a SIGKILL") == "killed by SIGTERM"
    assert exit_cause(-signal.SIGKILL, oom="the kernel log names it") == (
        "killed by the kernel's OOM killer (SIGKILL; the kernel log names it)")


async def _pending_then(cluster: sl.LocalCluster, act: str, *args: int) -> sl.NodeLost:
    """Park two asks on worker 0, make it end (``act``), return what the asks got."""
    fragile = await cluster.nodes[0].spawn(FRAGILE)
    got: list[BaseException] = []

    async def parked() -> None:
        try:
            await fragile.hang()
        except sl.ShardlineError as exc:
            got.append(exc)

    with anyio.fail_after(10):   # the parent knows at once: well inside peer_timeout
        async with anyio.create_task_group() as tg:
            tg.start_soon(parked)
            tg.start_soon(parked)
            peer = next(p for p in cluster.node.peers() if p.address == fragile.address)
            while len(peer.pending) < 2:
                await anyio.sleep(0.01)
            if act == "kill":
                os.kill(cluster.pids()[0], args[0])
            else:
                await fragile.tell(act, *args)
    assert len(got) == 2 and all(isinstance(e, sl.NodeLost) for e in got), got
    with pytest.raises(sl.NodeLost):       # new asks fail too, and say the same
        await fragile.pid()
    with pytest.raises(sl.NodeLost) as new_spawn:
        await cluster.nodes[0].spawn(FRAGILE)
    assert str(new_spawn.value) == str(got[0])
    return got[0]  # type: ignore[return-value]


async def test_a_killed_worker_is_named_with_its_signal() -> None:
    # peer_timeout is long: only the parent's knowledge can be this fast
    async with sl.LocalCluster(2, allow=["tests"], peer_timeout=60) as cluster:
        pid, address = cluster.pids()[0], cluster.nodes[0].address
        lost = await _pending_then(cluster, "kill", signal.SIGKILL)
        text = str(lost)
        assert text.startswith(f"worker 0 (pid {pid} on {os.uname().nodename}, {address})")
        assert text.endswith("killed by SIGKILL")
        node, ended = cluster.lost[0]
        assert node.pid == pid and node.address == address
        assert ended.pid == pid and ended.returncode == -signal.SIGKILL
        other = await cluster.nodes[1].spawn(FRAGILE)   # the other worker is untouched
        assert await other.pid() == cluster.pids()[1]


async def test_an_exit_code_is_named() -> None:
    async with sl.LocalCluster(1, allow=["tests"], peer_timeout=60) as cluster:
        lost = await _pending_then(cluster, "exit", 3)
        assert str(lost).endswith("exited with code 3")
        assert cluster.lost[0][1].returncode == 3


async def test_restart_hands_back_a_replacement() -> None:
    async with sl.LocalCluster(2, allow=["tests"], peer_timeout=60,
                               restart=True) as cluster:
        old, other = cluster.nodes
        first_pid = cluster.pids()[0]
        os.kill(first_pid, signal.SIGKILL)
        new = await cluster.replacement(old, timeout=30)
        assert new is not old and cluster.nodes == [new, other]
        assert new.pid == cluster.pids()[0] != first_pid and new.local_rank == 0
        assert await cluster.replacement(old, timeout=1) is new   # already replaced
        fragile = await new.spawn(FRAGILE)
        assert await fragile.environ("SHARDLINE_LOCAL_RANK") == "0"
        with pytest.raises(sl.NodeLost, match="killed by SIGKILL"):
            await old.spawn(FRAGILE)

        # A worker the caller gave up on while it still runs is killed, then replaced.
        hung_pid = new.pid
        newer = await cluster.replacement(new, timeout=30)
        assert newer.pid != hung_pid and cluster.nodes[0] is newer
        assert "killed by SIGKILL" in str(cluster.lost[-1][1].cause)

        with pytest.raises(ValueError, match="not a worker"):
            await cluster.replacement(sl.RemoteNode(cluster.node, "tcp://127.0.0.1:1", "x"))
    async with sl.LocalCluster(1) as plain:
        with pytest.raises(RuntimeError, match="restart=True"):
            await plain.replacement(plain.nodes[0])


# -- the OOM killer, for real: a memory cgroup with a small limit ------------------------------

def _memory_cgroup() -> Path | None:
    """A fresh child of this process's memory cgroup (v1 or v2), or None."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            parent = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            limit = "memory.limit_in_bytes"
        elif controllers == "" and Path("/sys/fs/cgroup/cgroup.controllers").exists():
            parent = Path("/sys/fs/cgroup") / path.lstrip("/")
            limit = "memory.max"
        else:
            continue
        child = parent / f"shardline-test-{uuid.uuid4().hex[:8]}"
        try:
            child.mkdir()
            (child / limit).write_text(str(200 << 20))
            return child
        except OSError:
            if child.exists():
                child.rmdir()
    return None


@pytest.fixture
def small_cgroup() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root to make a memory cgroup")
    group = _memory_cgroup()
    if group is None:
        pytest.skip("no writable memory cgroup here")
    try:
        yield group
    finally:
        for _ in range(100):   # empty once its (killed) processes are reaped
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)


@pytest.mark.timeout(120)
async def test_an_oom_kill_is_named(small_cgroup: Path) -> None:
    async with sl.LocalCluster(1, allow=["tests"], peer_timeout=60) as cluster:
        fragile = await cluster.nodes[0].spawn(FRAGILE)
        (small_cgroup / "cgroup.procs").write_text(str(cluster.pids()[0]))
        with pytest.raises(sl.NodeLost) as caught:
            await fragile.hog(1024)
        assert "killed by the kernel's OOM killer" in str(caught.value), caught.value
        assert cluster.lost[0][1].returncode == -signal.SIGKILL


@pytest.mark.timeout(60)
def test_the_cgroup_counter_alone_tells_an_oom_kill(small_cgroup: Path) -> None:
    # The child moves itself into the cgroup before it allocates, so the witness
    # (made at start) samples that cgroup's counter; the kernel log is not read.
    hog = ("import os,sys,time; open(sys.argv[1],'w').write(str(os.getpid())); "
           "time.sleep(0.5); b=bytearray(600<<20); b[::4096]=b'x'*len(b[::4096])")
    proc = subprocess.Popen([sys.executable, "-c", hog, str(small_cgroup / "cgroup.procs")])
    try:
        deadline = time.monotonic() + 20
        while small_cgroup.name not in Path(f"/proc/{proc.pid}/cgroup").read_text():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        witness = OomWitness(proc.pid)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        verdict = witness.verdict(read_kernel_log=False)
        assert verdict is not None and "oom_kill" in verdict and small_cgroup.name in verdict
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
