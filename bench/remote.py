"""Between two processes over tcp://127.0.0.1: raw pyzmq (asyncio and blocking) vs
shardline asks.

    python -m bench.remote [--n 3000] [--mib 64] [--trials 5]

(a) round-trip latency with one outstanding; (b) throughput with 100 in flight;
(c) bandwidth for a 64 MiB float32 tensor argument (shardline: shared memory, the two
    processes being on one host) vs raw zero-copy ZeroMQ over TCP;
(d) with CUDA: a 256 MiB CUDA tensor by IPC handle vs ``.cpu()`` + raw ZeroMQ.

Baselines, each a separate server process alive for the whole run: an asyncio ROUTER
echo (plain ``await send`` / ``await recv`` per message), a blocking REP echo (REQ/REP,
one outstanding), and a blocking ROUTER echo (a blocking DEALER keeps 100 requests in
flight; it also takes the zero-copy 64 MiB frames). Each figure alternates baseline
and shardline trials so that drift on a shared machine hits all alike, and reports
the medians; ``ratio`` compares shardline with the blocking baseline (the issue's
bar), ``ratio_asyncio`` with the asyncio one.
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

    def on_gpu(self, t: Any) -> list[Any]:
        return [str(t.device), float(t[-1])]


async def asyncio_server() -> None:
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


def blocking_server(kind: str) -> None:
    """A REP echo (``rep``) or a ROUTER echo (``router``), blocking calls only."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REP if kind == "rep" else zmq.ROUTER)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    sys.stdout.write(f"{port}\n")
    sys.stdout.flush()
    if kind == "rep":
        while True:
            sock.send(sock.recv())
    while True:
        frames = sock.recv_multipart(copy=False)
        if len(frames) > 2:
            sock.send_multipart([frames[0], str(len(frames[2])).encode()])
        else:
            sock.send_multipart(frames, copy=False)


class AsyncioRaw:
    """The asyncio baseline client: ``await send`` / ``await recv_multipart``."""

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


class BlockingRaw:
    """The blocking baselines: REQ/REP with one outstanding; a DEALER with a window."""

    def __init__(self, rep_port: int, router_port: int) -> None:
        self.ctx = zmq.Context()
        self.req = self.ctx.socket(zmq.REQ)
        self.req.connect(f"tcp://127.0.0.1:{rep_port}")
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.RCVHWM, 0)
        self.dealer.setsockopt(zmq.SNDHWM, 0)
        self.dealer.connect(f"tcp://127.0.0.1:{router_port}")

    async def latency(self, n: int, payload: bytes) -> float:
        req = self.req
        t0 = time.perf_counter()
        for _ in range(n):
            req.send(payload)
            req.recv()
        return (time.perf_counter() - t0) / n * 1e6

    async def throughput(self, total: int, payload: bytes, width: int = 100) -> float:
        sock = self.dealer
        t0 = time.perf_counter()
        for _ in range(width):
            sock.send(payload)
        for sent in range(width, total + width):
            sock.recv()
            if sent < total:
                sock.send(payload)
        return total / (time.perf_counter() - t0)

    async def bandwidth(self, big: Any, rounds: int) -> float:
        sock = self.dealer
        t0 = time.perf_counter()
        for _ in range(rounds):
            sock.send_multipart([b"h", big], copy=False)
            sock.recv()
        return rounds * big.nbytes / (time.perf_counter() - t0) / 2**20

    async def cuda_bandwidth(self, big: Any, rounds: int) -> float:
        """``.cpu()`` then the raw zero-copy send: what a CUDA tensor costs without IPC."""
        sock = self.dealer
        t0 = time.perf_counter()
        for _ in range(rounds):
            sock.send_multipart([b"h", big.cpu().numpy()], copy=False)
            sock.recv()
        return rounds * big.nbytes / (time.perf_counter() - t0) / 2**20

    def close(self) -> None:
        self.req.close(linger=0)
        self.dealer.close(linger=0)
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

    async def cuda_bandwidth(self, big: Any, rounds: int) -> float:
        t0 = time.perf_counter()
        for _ in range(rounds):
            device, last = await self.ref.on_gpu(big)
            assert device == "cuda:0" and last == float(big[-1]), (device, last)
        return rounds * big.nbytes / (time.perf_counter() - t0) / 2**20


Measure = Callable[[], Awaitable[float]]


async def alternate(trials: int, *runs: Measure) -> list[float]:
    """Medians of ``trials`` runs of each, taking turns (after one warm-up of each)."""
    for run_once in runs:
        await run_once()
    samples: list[list[float]] = [[] for _ in runs]
    for _ in range(trials):
        for i, run_once in enumerate(runs):
            samples[i].append(await run_once())
    return [statistics.median(s) for s in samples]


async def run(ports: dict[str, int], n: int, mib: int, trials: int) -> None:
    import torch

    payload = b"x" * 64
    araw = AsyncioRaw(ports["asyncio"])
    braw = BlockingRaw(ports["rep"], ports["router"])
    results = []
    try:
        async with sl.LocalCluster(1, allow=["bench"]) as cluster:
            ours = Ours(await cluster.nodes[0].spawn("bench.remote:Echo"))
            results.append(("rtt_us", "latency, one outstanding", "lower", await alternate(
                trials, lambda: araw.latency(n, payload), lambda: braw.latency(n, payload),
                lambda: ours.latency(n, payload))))
            results.append(("per_s_100_in_flight", "throughput, 100 in flight", "higher",
                            await alternate(trials, lambda: araw.throughput(4 * n, payload),
                                            lambda: braw.throughput(4 * n, payload),
                                            lambda: ours.throughput(4 * n, payload))))
            big_np = np.ones(mib << 18, dtype=np.float32)
            big_t = torch.ones(mib << 18, dtype=torch.float32)
            results.append((f"mib_per_s_{mib}mib_tensor", "bandwidth, one host", "higher",
                            await alternate(trials, lambda: araw.bandwidth(big_np, 5),
                                            lambda: braw.bandwidth(big_np, 5),
                                            lambda: ours.bandwidth(big_t, 5))))
            if torch.cuda.is_available():
                gpu = torch.arange(256 << 18, dtype=torch.float32, device="cuda:0")
                cpu_then_tcp, ipc = await alternate(
                    trials, lambda: braw.cuda_bandwidth(gpu, 3),
                    lambda: ours.cuda_bandwidth(gpu, 3))
                emit(bench="remote", metric="mib_per_s_256mib_cuda_tensor",
                     what="CUDA tensor to another process: IPC handle vs .cpu() + TCP",
                     cpu_then_tcp=round(cpu_then_tcp, 1), shardline_ipc=round(ipc, 1),
                     ratio=round(ipc / cpu_then_tcp, 3), better="higher")
    finally:
        araw.close()
        braw.close()
    for metric, what, better, (a, b, o) in results:
        emit(bench="remote", metric=metric, what=what, raw_pyzmq_asyncio=round(a, 1),
             raw_pyzmq_blocking=round(b, 1), shardline=round(o, 1), ratio=round(o / b, 3),
             ratio_asyncio=round(o / a, 3), better=better)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--server", choices=["asyncio", "rep", "router"],
                        help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.server == "asyncio":
        sl.run(asyncio_server())
        return
    if opts.server is not None:
        blocking_server(opts.server)
        return
    servers = {kind: subprocess.Popen([sys.executable, "-m", "bench.remote", "--server", kind],
                                      stdout=subprocess.PIPE, text=True)
               for kind in ("asyncio", "rep", "router")}
    try:
        ports = {}
        for kind, server in servers.items():
            assert server.stdout is not None
            ports[kind] = int(server.stdout.readline())
        sl.run(run(ports, opts.n, opts.mib, opts.trials))
    finally:
        for server in servers.values():
            server.kill()
            server.wait()
            if server.stdout is not None:
                server.stdout.close()


if __name__ == "__main__":
    main()
