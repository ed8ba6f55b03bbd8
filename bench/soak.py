"""Soak: a bounded run of mixed load, some of it hostile, against a real server.

    python -m bench.soak [--seconds 600] [--clients 64] [--hostile 0.01] [--kill-every S]

``shardline serve --model minilm --stages 2`` (two worker processes) answers
``--clients`` keep-alive clients: embeddings of 1-4 texts mostly, a few /v1/models and
/healthz, and a ``--hostile`` share of requests built to hurt: bodies over the size
limit, 100,000-deep nesting, lone surrogates and bytes that are not UTF-8, bodies cut
short, connections that never send a byte or never finish their head. After a warm-up
(a fifth of the run, at most a minute) the run is measured: statuses by code, resident
memory of the server and of each worker at the start and the end of the measured part
(growth is the ratio, the baseline of the same run; also over the second half alone,
which tells a leak, growing all along, from the allocator settling, which stops), the
server's event-loop lag p99 (from its /metrics), throughput. A JSON line every minute
(or quarter of the measured part, if shorter), one at the end.

``--kill-every S`` SIGKILLs a random worker every S seconds (off by default): the server
restarts it and rebuilds its stage, and requests in the gap get 503 with Retry-After
(counted apart: ``503_retry_after``; a 503 outside a gap, /healthz's included, or any
other 5xx is a failure). The JSON lines then
say how long each kill took to heal (kill to /healthz 200) and what the recoveries
counters say; a restarted worker's memory is measured from its own start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskGroup

from bench._common import emit, stop_server
from bench.serve import corpus

HOSTILE = ("huge", "deep", "surrogate", "not_utf8", "truncated", "idle", "half_head")


class Client:
    """One keep-alive HTTP/1.1 connection (httpx's CPU per request would come out of
    the server's two cores); reconnects after the server closes it."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        status, payload, _ = await self.exchange(method, path, body)
        return status, payload

    async def exchange(self, method: str, path: str,
                       body: bytes = b"") -> tuple[int, bytes, bool]:
        """Status, body, and whether the answer says Retry-After."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n"
                          f"Content-Type: application/json\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length, close, retry = 0, False, False
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection" and b"close" in value.lower():
                    close = True
                elif name == b"retry-after":
                    retry = True
            payload = await self.reader.readexactly(length)
        except BaseException:
            self.close()
            raise
        if close:
            self.close()
        return status, payload, retry

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


class Soak:
    def __init__(self, url: str, texts: list[str], opts: argparse.Namespace) -> None:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.texts = texts
        self.opts = opts
        self.rng = random.Random(opts.seed)
        self.statuses: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()  # "STATUS PATH" of what was not a 2xx
        self.hostile: dict[str, Counter[str]] = {kind: Counter() for kind in HOSTILE}
        self.texts_embedded = 0
        self.kills = 0
        self.healed_s: list[float] = []  # kill to /healthz 200, each kill
        self.healing = False  # from a kill to /healthz 200: the gap a 503 is allowed in
        self.measuring = False

    def count(self, status: int | str, kind: str | None = None) -> None:
        if not self.measuring:
            return
        if kind is None:
            self.statuses[str(status)] += 1
        else:
            self.hostile[kind][str(status)] += 1

    async def client(self, stop: anyio.Event, tg: TaskGroup) -> None:
        conn = Client(self.host, self.port)
        try:
            while not stop.is_set():
                roll = self.rng.random()
                if roll < self.opts.hostile:  # beside this client: some hold on for long
                    tg.start_soon(self.hostile_request, self.rng.choice(HOSTILE))
                    continue
                if roll < self.opts.hostile + 0.04:
                    method, path, body, n = "GET", "/v1/models", b"", 0
                elif roll < self.opts.hostile + 0.05:
                    method, path, body, n = "GET", "/healthz", b"", 0
                else:
                    n = self.rng.randint(1, 4)
                    method, path = "POST", "/v1/embeddings"
                    body = json.dumps({
                        "model": "minilm", "input": self.rng.sample(self.texts, n),
                        "encoding_format": self.rng.choice(("float", "base64"))}).encode()
                try:
                    with anyio.fail_after(self.opts.request_timeout):
                        status, _, retry = await conn.exchange(method, path, body)
                except TimeoutError:
                    self.count("client_timeout")
                    if self.measuring:
                        self.failures[f"client_timeout {path}"] += 1
                    continue
                except (OSError, asyncio.IncompleteReadError):
                    self.count("connection_error")
                    if self.measuring:
                        self.failures[f"connection_error {path}"] += 1
                    continue
                if status == 503 and retry and self.healing:
                    # a killed worker is being replaced: what the server must answer
                    self.count("503_retry_after")
                    await anyio.sleep(0.5)
                    continue
                self.count(status)
                if status >= 300 and self.measuring:
                    self.failures[f"{status} {path}"] += 1
                if status == 200 and self.measuring:
                    self.texts_embedded += n
        finally:
            conn.close()

    async def hostile_request(self, kind: str) -> None:
        """On a connection of its own: most of these end it."""
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port)
        except OSError:
            self.count("connection_error", kind)
            return
        head = "POST /v1/embeddings HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\n"
        try:
            with anyio.fail_after(self.opts.request_timeout):
                if kind == "huge":
                    body = b'{"model": "minilm", "input": "' + b"w " * (3 << 20) + b'"}'
                elif kind == "deep":
                    body = b'{"model": "minilm", "input": ' + b"[" * 100_000 + \
                        b"]" * 100_000 + b"}"
                elif kind == "surrogate":
                    body = b'{"model": "minilm", "input": ["fine", "\\ud800"]}'
                elif kind == "not_utf8":
                    body = b'{"model": "minilm", "input": "\xff\xfe"}'
                elif kind == "truncated":  # promise 1000 bytes, send 20, leave
                    writer.write(f"{head}Content-Length: 1000\r\n\r\n".encode() +
                                 b'{"model": "minilm",')
                    await writer.drain()
                    self.count("sent", kind)
                    return
                else:  # idle, half_head: hold the connection until the server drops it
                    if kind == "half_head":
                        writer.write(head.encode())
                        await writer.drain()
                    self.count(await _until_closed(reader), kind)
                    return
                writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
                await writer.drain()
                line = await reader.readline()
                self.count(int(line.split(b" ", 2)[1]) if line else "closed", kind)
        except TimeoutError:
            self.count("client_timeout", kind)
        except (OSError, asyncio.IncompleteReadError, IndexError, ValueError):
            self.count("connection_error", kind)
        finally:
            writer.close()

    async def killer(self, server_pid: int) -> None:
        while True:
            await anyio.sleep(self.opts.kill_every)
            workers = children(server_pid)
            if not workers:
                continue
            with contextlib.suppress(ProcessLookupError):
                self.healing = True
                os.kill(self.rng.choice(workers), signal.SIGKILL)
                killed = time.monotonic()
                self.kills += 1
                await anyio.sleep(0.3)  # the server notices at once
                conn = Client(self.host, self.port)
                try:
                    while True:
                        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                            if (await conn.request("GET", "/healthz"))[0] == 200:
                                break
                        await anyio.sleep(0.1)
                finally:
                    conn.close()
                self.healed_s.append(round(time.monotonic() - killed, 2))
                await anyio.sleep(1.0)  # answers already on their way
                self.healing = False


async def _until_closed(reader: asyncio.StreamReader) -> str:
    """What the server did with a connection left waiting: its status, or "closed"."""
    data = await reader.read(65536)
    while data and b"\r\n" not in data:
        more = await reader.read(65536)
        if not more:
            break
        data += more
    return data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/1.1 ") else "closed"


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(p) for p in path.read_text().split()]
    except OSError:
        return []


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


async def scrape(host: str, port: int) -> dict[str, float]:
    conn = Client(host, port)
    try:
        with anyio.fail_after(30):
            status, text = await conn.request("GET", "/metrics")
            if status != 200:
                raise RuntimeError(f"/metrics answered {status}")
    finally:
        conn.close()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.decode().splitlines() if line and not line.startswith("#")}


def lag_quantile(before: dict[str, float], after: dict[str, float], q: float) -> float | None:
    """The upper bound of the histogram bucket holding quantile ``q`` of the loop-lag
    samples taken between the two scrapes."""
    prefix = 'shardline_serve_loop_lag_seconds_bucket{le="'
    buckets = sorted((float(k[len(prefix):-2]), after[k] - before.get(k, 0.0))
                     for k in after if k.startswith(prefix))
    if not buckets or buckets[-1][1] <= 0:
        return None
    for bound, cumulative in buckets:
        if cumulative >= q * buckets[-1][1]:
            return bound
    return buckets[-1][0]


async def run(url: str, proc: subprocess.Popen[str], texts: list[str],
              opts: argparse.Namespace) -> dict[str, Any]:
    soak = Soak(url, texts, opts)
    warmup = min(60.0, opts.seconds / 5)
    stop = anyio.Event()
    idle_rss = {"server": rss_mb(proc.pid),
                "workers": [rss_mb(w) for w in children(proc.pid)]}
    async with anyio.create_task_group() as tg:
        for _ in range(opts.clients):
            tg.start_soon(soak.client, stop, tg)
        if opts.kill_every:
            tg.start_soon(soak.killer, proc.pid)
        await anyio.sleep(warmup)
        soak.measuring = True
        started = time.monotonic()
        before = await scrape(soak.host, soak.port)
        def rss() -> dict[str, Any]:
            workers = children(proc.pid)  # restarted ones too, after a kill
            return {"server": rss_mb(proc.pid), "pids": workers,
                    "workers": [rss_mb(w) for w in workers]}

        start_rss = rss()
        measured = opts.seconds - warmup
        end = started + measured
        samples: list[tuple[float, dict[str, Any]]] = [(0.0, start_rss)]
        while (left := end - time.monotonic()) > 0:
            await anyio.sleep(min(60.0, measured / 4, left))
            if time.monotonic() < end:
                samples.append((time.monotonic() - started, rss()))
                emit(bench="soak", progress_s=round(samples[-1][0]),
                     by_status=dict(soak.statuses), failures=dict(soak.failures),
                     server_rss_mb=samples[-1][1]["server"],
                     workers_rss_mb=samples[-1][1]["workers"], kills=soak.kills,
                     kill_to_healthz_s=list(soak.healed_s))
        elapsed = time.monotonic() - started
        after = await scrape(soak.host, soak.port)
        end_rss = rss()
        # a leak grows all along; the allocator's warm-up stops: compare the second half
        middle = min(samples, key=lambda sample: abs(sample[0] - elapsed / 2))[1]
        stop.set()
        tg.cancel_scope.cancel()

    def growth(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else round(b / a - 1, 4)

    def growths(a: dict[str, Any], b: dict[str, Any]) -> list[float | None]:
        """The server's, then each worker's; None for a worker restarted in between (a
        new process: its growth since its own start is not comparable)."""
        before = dict(zip(a["pids"], a["workers"], strict=True))
        return [growth(a["server"], b["server"])] + [
            growth(before.get(pid), y) for pid, y in zip(b["pids"], b["workers"],
                                                         strict=True)]

    whole, second_half = growths(start_rss, end_rss), growths(middle, end_rss)
    ok = sum(n for code, n in soak.statuses.items() if code.startswith("2"))
    # a 503 with Retry-After while a killed worker is replaced is the answer asked for
    server_5xx = {code: n for code, n in soak.statuses.items()
                  if code.startswith("5") and code != "503_retry_after"}
    for kind in HOSTILE:
        for code, n in soak.hostile[kind].items():
            if code.startswith("5"):
                server_5xx[f"{kind}:{code}"] = n
    return {
        "bench": "soak", "seconds": round(elapsed, 1), "warmup_s": round(warmup, 1),
        "clients": opts.clients, "hostile_share": opts.hostile,
        "by_status": dict(sorted(soak.statuses.items())),
        "failures": dict(sorted(soak.failures.items())),
        "hostile": {k: dict(v) for k, v in soak.hostile.items()},
        "count_2xx": ok,
        "count_4xx": sum(n for c, n in soak.statuses.items() if c.startswith("4")),
        "count_5xx": sum(server_5xx.values()), "5xx_by_code": server_5xx,
        "requests_per_s": round(ok / elapsed, 1),
        "texts_per_s": round(soak.texts_embedded / elapsed, 1),
        "rss_mb_idle": idle_rss, "rss_mb_start": start_rss, "rss_mb_end": end_rss,
        "rss_mb_middle": middle, "rss_growth": whole,
        "max_rss_growth": max((g for g in whole if g is not None), default=None),
        "rss_growth_second_half": second_half,
        "max_rss_growth_second_half": max((g for g in second_half if g is not None),
                                          default=None),
        "loop_lag_p50_s": lag_quantile(before, after, 0.50),
        "loop_lag_p99_s": lag_quantile(before, after, 0.99),
        "loop_lag_max_s": lag_quantile(before, after, 1.0),
        "kills": soak.kills, "kill_to_healthz_s": soak.healed_s,
        "503_retry_after": soak.statuses.get("503_retry_after", 0),
        "recoveries": {k.split('"')[1]: v for k, v in after.items()
                       if k.startswith("shardline_recoveries_total{")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--hostile", type=float, default=0.01,
                        help="share of requests that are hostile (default 0.01)")
    parser.add_argument("--kill-every", type=float, default=None, metavar="SECONDS",
                        help="SIGKILL a random worker every SECONDS (default: never)")
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--request-timeout", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-log", type=Path, default=None,
                        help="keep the server's stderr (at log level info) in this file")
    opts = parser.parse_args()
    texts = corpus(400)
    with tempfile.TemporaryDirectory() as tmp:
        log = opts.server_log or Path(tmp) / "server.log"
        with log.open("w") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "shardline.cli", "serve", "--model", "minilm",
                 "--stages", str(opts.stages), "--port", "0", "--log-level", "info"],
                stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            assert proc.stdout is not None
            url = proc.stdout.readline().split()[2]
            result = anyio.run(run, url, proc, texts, opts)
            result["server_alive"] = proc.poll() is None
            result["server_log_errors"] = sum(
                1 for line in log.read_text().splitlines()
                if "ERROR" in line or "Traceback" in line)
        finally:
            stop_server(proc)
    emit(**result)


if __name__ == "__main__":
    main()
