"""Helpers shared by the benchmarks: timing, medians, JSON lines."""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any


def emit(**fields: Any) -> None:
    """One JSON object per line on stdout: the format every benchmark prints."""
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


async def per_op_us(op: Callable[[], Awaitable[Any]], n: int, repeats: int = 5) -> float:
    """Median over ``repeats`` of the mean cost of ``op`` in microseconds."""
    for _ in range(min(n, 1000)):  # warm up caches and the allocator
        await op()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            await op()
        samples.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(samples)


def run_torch_ranks(module: str, ranks: int, args: Sequence[str],
                    env: dict[str, str]) -> float:
    """Start ``python -m module --torch-rank R --port P *args`` for every rank (the
    torch.distributed baselines); returns the float rank 0 prints last."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-m", module, "--torch-rank", str(r),
                               "--port", str(port), *args],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, **env})
             for r in range(ranks)]
    try:
        out, _ = procs[0].communicate(timeout=600)
        for proc in procs[1:]:
            proc.wait(timeout=60)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
    return float(out.strip().splitlines()[-1])


def stop_server(proc: subprocess.Popen[str]) -> None:
    """SIGINT (the server stops its workers), SIGKILL if it has not ended in 30 s."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
