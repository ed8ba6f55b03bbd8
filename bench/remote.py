"""Between two processes over tcp://127.0.0.1: raw pyzmq asyncio vs shardline asks.

    python -m bench.remote [--n 3000] [--mib 64] [--trials 3]

(a) round-trip latency with one outstanding; (b) throughput with 100 in flight;
(c) bandwidth for a 64 MiB float32 tensor argument vs raw zero-copy zmq.
The raw server (an asyncio ROUTER echo) and the shardline worker are separate
processes, both alive for the whole run; each figure alternates raw and shardline
trials so that drift on a shared machine hits both alike, and reports the medians.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import zmq
import zmq.asyncio

import shardline as sl
from bench._common import emit


class Echo(sl.Actor):
    def echo(self, x: Any) -> Any:
        return x

    def nbytes(self, t: Any) -> int:
        return int(t.nbytes)


async def raw_server() -> None:
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.ROUTER)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    sys.stdout.write(f"{port}\n")
    sys.stdout.flush()
    while True:
        frames = await sock.recv_multipart(copy=False)
        if len(frames) > 2:  # a bulk frame: answer with its size, like the actor does
            await sock.send_multipart([frames[0], str(len(frames[2])).encode()])
        else:
            await sock.send_multipart(frames)


class Raw:
    """The baseline client: plain ``await send`` / ``await recv_multipart`` per message."""

    def __init__(self, port: int) -> None:
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.connect(f"tcp://127.0.0.1:{port}")

    async def latency(self, n: int, payload: bytes) -> float:
        sock = self.sock
        t0 = time.perf_counter()
        for _ in range(n):
            await sock.send(payload)
            await sock.recv_multipart()
        return (time.perf_counter() - t0) / n * 1e6

    async def throughput(self, total: int, payload: bytes, width: int = 100) -> float:
        """Keep ``width`` requests in flight: each reply (one awaited recv) frees a slot."""
        sock = self.sock
        t0 = time.perf_counter()
        sent = done = 0
        while sent < width:
            await sock.send(payload)
            sent += 1
        while done < total:
            await sock.recv_multipart()
            done += 1
            if sent < total:
                await sock.send(payload)
                sent += 1
        return total / (time.perf_counter() - t0)

    async def bandwidth(self, big: np.ndarray[Any, Any], rounds: int) -> float:
        sock = self.sock
        t0 = time.perf_counter()
        for _ in range(rounds):
            await sock.send_multipart([b"h", big], copy=False)
            await sock.recv()
        return rounds * big.nbytes / (time.perf_counter() - t0) / 2**20

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


class Ours:
    def __init__(self, ref: sl.ActorRef) -> None:
        self.ref = ref

    async def latency(self, n: int, payload: bytes) -> float:
        echo = self.ref.echo
        t0 = time.perf_counter()
        for _ in range(n):
            await echo(payload)
        return (time.perf_counter() - t0) / n * 1e6

    async def throughput(self, total: int, payload: bytes, width: int = 100) -> float:
        import anyio

        echo = self.ref.echo
        per_caller = total // width

        async def caller() -> None:
            for _ in range(per_caller):
                await echo(payload)

        t0 = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(width):
                tg.start_soon(caller)
        return per_caller * width / (time.perf_counter() - t0)

    async def bandwidth(self, big: Any, rounds: int) -> float:
        t0 = time.perf_counter()
        for _ in range(rounds):
            await self.ref.nbytes(big)
        return rounds * big.nbytes / (time.perf_counter() - t0) / 2**20


async def alternate(trials: int, raw: Callable[[], Awaitable[float]],
                    ours: Callable[[], Awaitable[float]]) -> tuple[float, float]:
    await raw()
    await ours()  # warm-up of both paths
    r, o = [], []
    for _ in range(trials):
        r.append(await raw())
        o.append(await ours())
    return statistics.median(r), statistics.median(o)


async def run(port: int, n: int, mib: int, trials: int) -> None:
    import torch

    payload = b"x" * 64
    raw = Raw(port)
    try:
        async with sl.LocalCluster(1, allow=["bench"]) as cluster:
            ours = Ours(await cluster.nodes[0].spawn("bench.remote:Echo"))
            results = [
                ("rtt_us", "latency, one outstanding", "lower", *await alternate(
                    trials, lambda: raw.latency(n, payload),
                    lambda: ours.latency(n, payload))),
                ("per_s_100_in_flight", "throughput, 100 in flight", "higher",
                 *await alternate(trials, lambda: raw.throughput(4 * n, payload),
                                  lambda: ours.throughput(4 * n, payload))),
            ]
            big_np = np.ones(mib << 18, dtype=np.float32)
            big_t = torch.ones(mib << 18, dtype=torch.float32)
            results.append((f"mib_per_s_{mib}mib_tensor", "bandwidth", "higher",
                            *await alternate(trials, lambda: raw.bandwidth(big_np, 5),
                                             lambda: ours.bandwidth(big_t, 5))))
    finally:
        raw.close()
    for metric, what, better, r, o in results:
        emit(bench="remote", metric=metric, what=what, raw_pyzmq=round(r, 1),
             shardline=round(o, 1), ratio=round(o / r, 3), better=better)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--raw-server", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.raw_server:
        sl.run(raw_server())
        return
    server = subprocess.Popen([sys.executable, "-m", "bench.remote", "--raw-server"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        sl.run(run(port, opts.n, opts.mib, opts.trials))
    finally:
        server.kill()
        server.wait()
        if server.stdout is not None:
            server.stdout.close()


if __name__ == "__main__":
    main()
