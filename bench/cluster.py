"""Clusters: how fast one forms, and how fast a killed worker is known to be lost.

    python -m bench.cluster [--trials 5]

(a) ``shardline run`` on 4 ranks (4 local processes with SHARDLINE_* variables, as a
    launcher starts them) until the driver's ``cluster.nodes`` is ready; baseline, in
    the same run: 4 bare ``python -c "import shardline"`` processes, started together,
    until all have exited (what any Python launcher pays before doing anything).
(b) ``kill -9`` of a worker until a pending ask fails with ``NodeLost``: when the
    parent knows (``LocalCluster``; ``shardline run``'s per-rank supervisor, which
    reports to the driver), against a plain ``node.connect`` to a node whose death
    only shows as silence (the default ``peer_timeout`` of 5 s) or, where the transport
    notices it, a closed connection.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import anyio

import shardline as sl
from bench._common import emit

FORM = textwrap.dedent("""
    import sys, time
    import shardline as sl

    async def main() -> None:
        async with sl.Cluster.from_env(timeout=60) as cluster:
            sys.stdout.write(f"ready {time.time()} {len(cluster.nodes)}\\n")
            sys.stdout.flush()

    sl.run(main())
""")

KILL = textwrap.dedent("""
    import os, signal, sys, time
    import anyio
    import shardline as sl

    async def main() -> None:
        async with sl.Cluster.from_env(timeout=60) as cluster:
            sleeper = await cluster.nodes[0].spawn("bench.cluster:Sleeper")
            pid = await sleeper.pid()
            async with anyio.create_task_group() as tg:
                async def parked() -> None:
                    try:
                        await sleeper.hang()
                    except sl.NodeLost:
                        sys.stdout.write(f"lost {time.monotonic() - killed}\\n")
                tg.start_soon(parked)
                await anyio.sleep(0.3)
                killed = time.monotonic()
                os.kill(pid, signal.SIGKILL)

    sl.run(main())
""")


NO_PARENT = "plain connect, no parent: silence (peer_timeout=5) or a closed connection"


class Sleeper(sl.Actor):
    max_concurrency = 4

    def pid(self) -> int:
        return os.getpid()

    async def hang(self) -> None:
        await anyio.sleep_forever()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDLINE_")}
    env["PYTHONPATH"] = os.pathsep.join(p or os.getcwd() for p in sys.path)
    return {**env, **extra}


def _run_ranks(script: Path, world: int, *run_args: str) -> tuple[float, str]:
    """Start ``world`` ranks of ``shardline run script``; seconds from start to the
    end of all of them, and rank 0's output."""
    head = f"127.0.0.1:{_free_port()}"
    t0 = time.time()
    procs = [subprocess.Popen([sys.executable, "-m", "shardline.cli", "run", *run_args,
                               str(script)],
                              env=_env(SHARDLINE_RANK=str(r), SHARDLINE_WORLD_SIZE=str(world),
                                       SHARDLINE_HEAD=head),
                              stdout=subprocess.PIPE if r == 0 else subprocess.DEVNULL,
                              text=True) for r in range(world)]
    try:
        out, _ = procs[0].communicate(timeout=120)
        for proc in procs[1:]:
            proc.wait(timeout=60)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return t0, out


def form_once(script: Path) -> float:
    t0, out = _run_ranks(script, 4)
    ready = next(line for line in out.splitlines() if line.startswith("ready "))
    assert ready.split()[2] == "3", ready
    return float(ready.split()[1]) - t0


def imports_once() -> float:
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", "import shardline"], env=_env())
             for _ in range(4)]
    for proc in procs:
        proc.wait(timeout=60)
    return time.perf_counter() - t0


def run_supervisor_once(script: Path) -> float:
    _, out = _run_ranks(script, 2, "--allow", "bench", "--peer-timeout", "5")
    return float(next(line for line in out.splitlines() if line.startswith("lost ")).split()[1])


async def _parked_until_lost(node: sl.RemoteNode, pid: int) -> float:
    sleeper = await node.spawn("bench.cluster:Sleeper")
    elapsed: list[float] = []
    async with anyio.create_task_group() as tg:
        async def parked() -> None:
            try:
                await sleeper.hang()
            except sl.NodeLost:
                elapsed.append(time.monotonic() - killed)
        tg.start_soon(parked)
        await anyio.sleep(0.3)
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
    return elapsed[0]


async def local_cluster_once() -> float:
    async with sl.LocalCluster(1, allow=["bench"]) as cluster:
        return await _parked_until_lost(cluster.nodes[0], cluster.pids()[0])


async def _plain_connect(address: str, pid: int) -> float:
    async with sl.Node() as node:
        return await _parked_until_lost(await node.connect(address), pid)


def plain_connect_once() -> float:
    proc = subprocess.Popen([sys.executable, "-m", "shardline.cli", "node", "--allow", "bench"],
                            stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().split()[2]
        return sl.run(_plain_connect(address, proc.pid))
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=5)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        form, kill = Path(tmp, "form.py"), Path(tmp, "kill.py")
        form.write_text(FORM)
        kill.write_text(KILL)
        formed, imported = [], []
        for _ in range(opts.trials):   # alternated: drift on a shared machine hits both
            formed.append(form_once(form))
            imported.append(imports_once())
        f, b = statistics.median(formed), statistics.median(imported)
        emit(bench="cluster", case="shardline run, 4 ranks, to cluster.nodes ready",
             seconds=round(f, 3), baseline="4 x python -c 'import shardline', together",
             baseline_seconds=round(b, 3), ratio=round(f / b, 2), trials=opts.trials)

        plain = [plain_connect_once() for _ in range(max(1, opts.trials // 2))]
        p = statistics.median(plain)
        local = statistics.median(sl.run(local_cluster_once()) for _ in range(opts.trials))
        emit(bench="cluster", case="kill -9 to NodeLost, parent knows (LocalCluster)",
             seconds=round(local, 3), baseline=NO_PARENT,
             baseline_seconds=round(p, 3), ratio=round(local / p, 3), trials=opts.trials)
        run = statistics.median(run_supervisor_once(kill) for _ in range(opts.trials))
        emit(bench="cluster", case="kill -9 to NodeLost, shardline run's supervisor reports",
             seconds=round(run, 3), baseline=NO_PARENT,
             baseline_seconds=round(p, 3), ratio=round(run / p, 3), trials=opts.trials)


if __name__ == "__main__":
    main()
