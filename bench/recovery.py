"""Self-healing, measured: what a lost worker costs, and what being ready for one costs.

    python -m bench.recovery [--steps 10] [--skip-serve]

(a) Snapshot overhead: the demo's GPT, 2 stages in 2 workers plus a spare, AdamW, a step
    with ``snapshot_every=1`` (parameters and optimizer state copied to host memory after
    every step and sent to the other stage's node while the next step computes) against
    the same pipeline without snapshots, taking turns (target at most 1.05x).
(b) Training: ``kill -9`` of a stage's worker between two steps, then seconds until the
    next ``train_step`` returns (the loss noticed, the stage moved to the spare, its
    state restored, the step run again), against the plain step time.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import time
from typing import Any

import shardline as sl
from bench._common import emit
from bench.pipeline import step_times
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--peer-timeout", type=float, default=5.0,
                        help="the nodes' peer_timeout in (b) (default 5, the Node default)")
    opts = parser.parse_args()
    sl.run(snapshot_overhead(opts.steps, opts.rounds))
    sl.run(training_recovery(opts.steps, opts.peer_timeout))


if __name__ == "__main__":
    main()
