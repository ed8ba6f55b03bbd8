"""Self-healing, measured: what a lost worker costs, and what being ready for one costs.

    python -m bench.recovery [--steps 10] [--kills 3] [--skip-train] [--skip-serve]

(a) Snapshot overhead: the demo's GPT, 2 stages in 2 workers plus a spare, AdamW, a step
    with ``snapshot_every=1`` (parameters and optimizer state copied to host memory after
    every step and sent to the other stage's node while the next step computes) against
    the same pipeline without snapshots, taking turns (target at most 1.05x).
(b) Training: ``kill -9`` of a stage's worker between two steps, then seconds until the
    next ``train_step`` returns (the loss noticed, the stage moved to the spare, its
    state restored, the step run again), against the plain step time.
(c) Serving: ``shardline serve`` (2 stages, one worker each, or 2 replicas on 4 workers)
    under a light load of 4 clients; ``kill -9`` of a random worker, then seconds until
    ``/healthz`` is 200 again (the worker restarted, its stages rebuilt), against the
    server's own cold start (launch to the first 200) in the same run; and what the
    clients saw meanwhile (503s with Retry-After in the gap; none with replicas).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import anyio
import httpx

import shardline as sl
from bench._common import emit, stop_server
from bench.pipeline import step_times
from bench.soak import children
from shardline.models import Pipeline, gpt

GPT = {"blocks": 4, "dim": 128, "heads": 4, "seq": 64, "vocab": 256}
BATCH, MICRO = 16, 4
KWARGS: dict[str, Any] = {"microbatches": MICRO, "loss_fn": "shardline.models.gpt:loss",
                          "optimizer": ("torch.optim.AdamW", {"lr": 1e-3})}


def batch() -> Any:
    return next(gpt.batches(gpt.corpus(), BATCH, int(GPT["seq"])))


async def snapshot_overhead(steps: int, rounds: int) -> None:
    x, y = batch()
    plain: list[float] = []
    snap: list[float] = []
    async with sl.LocalCluster(3) as cluster:
        a, b, spare = cluster.nodes
        without = await Pipeline.start(cluster.node, gpt.spec(GPT), placement=[a, b],
                                       **KWARGS)
        with_snap = await Pipeline.start(cluster.node, gpt.spec(GPT), placement=[a, b],
                                         spares=[spare], snapshot_every=1, **KWARGS)
        for _ in range(rounds):
            plain.append(statistics.median(await step_times(without, x, y, steps)))
            snap.append(statistics.median(await step_times(with_snap, x, y, steps)))
        await without.stop()
        await with_snap.stop()
    base, ours = statistics.median(plain), statistics.median(snap)
    emit(bench="recovery", metric="snapshot_overhead_gpt", config=GPT, batch=BATCH,
         microbatches=MICRO, optimizer="AdamW", plain_step_ms=round(base * 1e3, 1),
         snapshot_step_ms=round(ours * 1e3, 1), ratio=round(ours / base, 3))


async def training_recovery(steps: int, peer_timeout: float) -> None:
    x, y = batch()
    async with sl.Node(peer_timeout=peer_timeout) as driver, \
            sl.LocalCluster(3, node=driver, peer_timeout=peer_timeout) as cluster:
        a, b, spare = cluster.nodes
        pipe = await Pipeline.start(driver, gpt.spec(GPT), placement=[a, b], spares=[spare],
                                    snapshot_every=1, **KWARGS)
        step = statistics.median(await step_times(pipe, x, y, steps))
        os.kill(cluster.pids()[1], signal.SIGKILL)
        t0 = time.perf_counter()
        await pipe.train_step(x, y)
        healed = time.perf_counter() - t0
        (record,) = (await pipe.stats())["recoveries"]
        await pipe.stop()
    emit(bench="recovery", metric="training_kill_to_step_s", peer_timeout_s=peer_timeout,
         step_ms=round(step * 1e3, 1), kill_to_step_s=round(healed, 2),
         recovery_s=round(record["seconds"], 2), restored_from=record["from"])


SERVED = {"minilm": ("/v1/embeddings", {"model": "minilm", "input": ["a steady load"]}),
          "gpt": ("/v1/completions", {"model": "gpt", "prompt": "Once upon a time",
                                      "max_tokens": 8, "temperature": 0})}


def serving_recovery(model: str, replicas: int, kills: int, seed: int) -> None:
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "shardline.cli", "serve", "--port", "0", "--model", model,
         "--stages", "2", "--replicas", str(replicas)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().split()[2]
        anyio.run(_kills, proc.pid, url, model, replicas, kills, random.Random(seed),
                  started)
    finally:
        stop_server(proc)


async def _kills(pid: int, url: str, model: str, replicas: int, kills: int,
                 rng: random.Random, started: float) -> None:
    path, body = SERVED[model]
    statuses: Counter[str] = Counter()
    gaps: list[float] = []
    rebuilt: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        await _healthy(http)
        cold = time.monotonic() - started
        stop = anyio.Event()

        async def client() -> None:
            while not stop.is_set():
                r = await http.post(path, json=body)
                retry = "Retry-After" in r.headers
                statuses[f"{r.status_code}{'+retry' if retry else ''}"] += 1
                if r.status_code == 503:
                    await anyio.sleep(float(r.headers.get("Retry-After", 1)))

        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(client)
            for k in range(kills):
                await anyio.sleep(2.0)
                os.kill(rng.choice(children(pid)), signal.SIGKILL)
                killed = time.monotonic()
                await anyio.sleep(0.3)  # noticed at once; not yet rebuilt
                await _healthy(http)
                gaps.append(time.monotonic() - killed)
                # with replicas the server may answer before the lost copy is back
                while (await _recoveries(http)).get("stage", 0) < k + 1:  # noqa: ASYNC110
                    await anyio.sleep(0.05)
                rebuilt.append(time.monotonic() - killed)
            stop.set()
        recoveries = await _recoveries(http)
    median = statistics.median(gaps)
    emit(bench="recovery", metric="serve_kill_to_healthz_s", model=model, stages=2,
         replicas=replicas, kills=kills, kill_to_healthz_s=[round(g, 2) for g in gaps],
         median_s=round(median, 2), max_s=round(max(gaps), 2),
         kill_to_stages_rebuilt_s=[round(g, 2) for g in rebuilt],
         cold_start_s=round(cold, 2), ratio_to_cold_start=round(median / cold, 3),
         requests=dict(statuses), recoveries=recoveries)


async def _recoveries(http: httpx.AsyncClient) -> dict[str, float]:
    text = (await http.get("/metrics")).text
    return {line.split('"')[1]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("shardline_recoveries_total{")}


async def _healthy(http: httpx.AsyncClient, timeout: float = 120.0) -> None:
    with anyio.fail_after(timeout):
        while True:
            try:
                if (await http.get("/healthz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await anyio.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--peer-timeout", type=float, default=5.0,
                        help="the nodes' peer_timeout in (b) (default 5, the Node default)")
    parser.add_argument("--kills", type=int, default=3, help="kills per server in (c)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-train", action="store_true", help="only (c)")
    parser.add_argument("--skip-serve", action="store_true", help="only (a) and (b)")
    opts = parser.parse_args()
    if not opts.skip_train:
        sl.run(snapshot_overhead(opts.steps, opts.rounds))
        sl.run(training_recovery(opts.steps, opts.peer_timeout))
    if not opts.skip_serve:
        # with replicas a heal copies a stage's state from its sibling: over 16 MiB
        # for MiniLM, a few hundred KiB for the small GPT
        for model, replicas in (("minilm", 1), ("minilm", 2), ("gpt", 1), ("gpt", 2)):
            serving_recovery(model, replicas, opts.kills, opts.seed)


if __name__ == "__main__":
    main()
