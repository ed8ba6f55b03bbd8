"""Between two processes over tcp://127.0.0.1: raw pyzmq asyncio vs shardline asks.

    python -m bench.remote [--n 5000] [--mib 64]

(a) round-trip latency with one outstanding; (b) throughput with 100 in flight;
(c) bandwidth for a 64 MiB float32 tensor argument vs raw zero-copy zmq.
The raw server (an asyncio ROUTER echo) and the shardline worker are each a separate
process; the client side runs here. Prints JSON lines with ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
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


# -- raw pyzmq ------------------------------------------------------------------------

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


async def raw_client(port: int, n: int, mib: int) -> tuple[float, float, float]:
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(f"tcp://127.0.0.1:{port}")
    payload = b"x" * 64
    for _ in range(500):
        await sock.send(payload)
        await sock.recv()
    t0 = time.perf_counter()
    for _ in range(n):
        await sock.send(payload)
        await sock.recv()
    latency = (time.perf_counter() - t0) / n * 1e6

    total = n * 4
    t0 = time.perf_counter()
    await raw_pipelined(sock, payload, total, 100)
    throughput = total / (time.perf_counter() - t0)

    big = np.ones(mib << 18, dtype=np.float32)
    rounds = 5
    await sock.send_multipart([b"h", big], copy=False)
    await sock.recv()
    t0 = time.perf_counter()
    for _ in range(rounds):
        await sock.send_multipart([b"h", big], copy=False)
        await sock.recv()
    bandwidth = rounds * big.nbytes / (time.perf_counter() - t0) / 2**20
    sock.close(linger=0)
    ctx.term()
    return latency, throughput, bandwidth


async def raw_pipelined(sock: Any, payload: bytes, total: int, width: int) -> None:
    """Keep ``width`` requests in flight: each reply (one awaited recv) frees a slot."""
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


# -- shardline ------------------------------------------------------------------------

async def shardline_client(n: int, mib: int) -> tuple[float, float, float]:
    import torch

    async with sl.LocalCluster(1, allow=["bench"]) as cluster:
        ref = await cluster.nodes[0].spawn("bench.remote:Echo")
        payload = b"x" * 64
        echo = ref.echo
        for _ in range(500):
            await echo(payload)
        t0 = time.perf_counter()
        for _ in range(n):
            await echo(payload)
        latency = (time.perf_counter() - t0) / n * 1e6

        total = n * 4
        per_caller = total // 100

        async def caller() -> None:
            for _ in range(per_caller):
                await echo(payload)

        t0 = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(100)))
        throughput = per_caller * 100 / (time.perf_counter() - t0)

        big = torch.ones(mib << 18, dtype=torch.float32)
        rounds = 5
        await ref.nbytes(big)
        t0 = time.perf_counter()
        for _ in range(rounds):
            await ref.nbytes(big)
        bandwidth = rounds * big.nbytes / (time.perf_counter() - t0) / 2**20
    return latency, throughput, bandwidth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--raw-server", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.raw_server:
        sl.run(raw_server())
        return
    server = subprocess.Popen([sys.executable, "-m", "bench.remote", "--raw-server"],
                              stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        raw = sl.run(raw_client(port, opts.n, opts.mib))
    finally:
        server.kill()
        server.wait()
    ours = sl.run(shardline_client(opts.n, opts.mib))
    names = [("rtt_us", "latency, one outstanding", True),
             ("per_s_100_in_flight", "throughput, 100 in flight", False),
             (f"mib_per_s_{opts.mib}mib_tensor", "bandwidth", False)]
    for (metric, what, lower_better), r, s in zip(names, raw, ours, strict=True):
        emit(bench="remote", metric=metric, what=what, raw_pyzmq=round(r, 1),
             shardline=round(s, 1), ratio=round(s / r, 3),
             better="lower" if lower_better else "higher")


if __name__ == "__main__":
    main()
