"""Serving benchmark, baseline in the same run.

    python -m bench.serve [--requests 1500] [--concurrency 32]

Embeddings over HTTP: ``shardline serve --model minilm --stages 2`` (2 worker
processes) answering ``--concurrency`` clients that each send one text per request,
against sentence-transformers encoding the same texts in this process with batch 32
(measured before and after, averaged). Prints requests/s for both, and shardline's
p50/p99 latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import subprocess
import sys
import time
from typing import Any

import anyio

from bench._common import emit, stop_server


def corpus(n: int) -> list[str]:
    """Real text of mixed length, 8 to 47 words each: Python's own help topics (pieces
    over the model's 256 tokens, a few tables of symbols, are left out)."""
    from pydoc_data.topics import topics

    from shardline.models import minilm

    tokenizer = minilm.Tokenizer()
    words = " ".join(topics.values()).split()
    out: list[str] = []
    i, length = 0, 8
    while len(out) < n:
        piece = " ".join(words[i % len(words):i % len(words) + length])
        i += length
        length = 8 + (i * 7) % 40
        if tokenizer.count(piece) <= tokenizer.max_tokens:
            out.append(piece)
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def baseline(texts: list[str]) -> float:
    """sentence-transformers in one process, batch 32: texts per second."""
    from sentence_transformers import SentenceTransformer

    from shardline.models import minilm

    model = SentenceTransformer(str(minilm.model_dir()), device="cpu")
    model.encode(texts[:64], batch_size=32, normalize_embeddings=True)  # warm-up
    t0 = time.perf_counter()
    model.encode(texts, batch_size=32, normalize_embeddings=True)
    return len(texts) / (time.perf_counter() - t0)


class _Connection:
    """A keep-alive HTTP/1.1 client for one connection. httpx costs ~2 ms of CPU per
    request, which on 2 cores the load generator would take from the server."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: dict[str, Any]) -> bytes:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        data = json.dumps(body).encode()
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\n"
                          f"Content-Type: application/json\r\n"
                          f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        payload = await self.reader.readexactly(length)
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {payload[:200]!r}")
        return payload

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def load(url: str, texts: list[str], concurrency: int) -> tuple[float, list[float]]:
    """Closed loop: ``concurrency`` clients, one text per request. (requests/s, latencies)"""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    latencies: list[float] = []
    todo = iter(range(len(texts)))
    connections = [_Connection(host, int(port)) for _ in range(concurrency)]

    async def client_loop(conn: _Connection) -> None:
        for i in todo:
            t0 = time.perf_counter()
            await conn.post("/v1/embeddings", {"model": "minilm", "input": texts[i],
                                               "encoding_format": "base64"})
            latencies.append(time.perf_counter() - t0)

    try:
        for conn, warm in zip(connections, texts, strict=False):  # warm everything up
            await conn.post("/v1/embeddings", {"model": "minilm", "input": warm})
        t0 = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for conn in connections:
                tg.start_soon(client_loop, conn)
        elapsed = time.perf_counter() - t0
    finally:
        for conn in connections:
            conn.close()
    return len(texts) / elapsed, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    opts = parser.parse_args()
    texts = corpus(opts.requests)
    # The baseline runs before and after the server, so drift on a shared machine
    # (the noisy neighbour of a minute ago) weighs on both sides alike.
    before = baseline(texts)
    proc = subprocess.Popen(
        [sys.executable, "-m", "shardline.cli", "serve", "--model", "minilm", "--stages",
         str(opts.stages), "--port", "0", "--max-batch", str(opts.concurrency),
         "--max-wait-ms", str(opts.max_wait_ms)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().split()[2]
        ours, latencies = anyio.run(load, url, texts, opts.concurrency)
    finally:
        stop_server(proc)
    theirs = (before + baseline(texts)) / 2
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    fields: dict[str, Any] = {
        "bench": "serve", "metric": "embeddings_per_s", "requests": len(texts),
        "concurrency": opts.concurrency, "stages": opts.stages,
        "sentence_transformers_per_s": round(theirs, 1), "shardline_per_s": round(ours, 1),
        "ratio": round(ours / theirs, 3), "better": "higher",
        "p50_ms": round(p50 * 1e3, 1), "p99_ms": round(p99 * 1e3, 1),
        "p99_over_p50": round(p99 / p50, 2)}
    emit(**fields)


if __name__ == "__main__":
    main()
