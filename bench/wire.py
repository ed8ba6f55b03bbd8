"""Compressed activations on the demo GPT: loss curve and bytes per step with each
``wire_dtype``, against the uncompressed run in the same run.

    python -m bench.wire [--steps 200]

The demo's GPT (4 blocks, dim 128, seq 64), 2 stages in 2 worker processes, 1F1B with
4 microbatches of 4 sequences, AdamW; every configuration trains from the same
initial weights on the same batches. ``bytes_per_step`` is what the step trace counts
on the stages' sends (activations forward, gradients backward; headers included);
``final_loss`` is the mean of the last 10 steps (one step's loss is noisy), and the
targets are ``final_loss_ratio`` within 2% and ``bytes_ratio`` at most 0.3 for int8.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import shardline as sl
from bench._common import emit
from shardline.models import Pipeline, gpt

GPT = {"blocks": 4, "dim": 128, "heads": 4, "seq": 64, "vocab": 256}
BATCH, MICRO = 16, 4
WIRE_DTYPES: tuple[str | None, ...] = (None, "bf16", "fp16", "int8")


async def train(cluster: sl.LocalCluster, wire_dtype: str | None, data: list[Any]
                ) -> dict[str, Any]:
    pipe = await Pipeline.start(cluster.node, gpt.spec(GPT), placement=cluster.nodes,
                                schedule="1f1b", microbatches=MICRO,
                                loss_fn="shardline.models.gpt:loss",
                                optimizer=("torch.optim.AdamW", {"lr": 3e-3}),
                                wire_dtype=wire_dtype, trace=True)
    try:
        losses = []
        t0 = time.perf_counter()
        for x, y in data:
            losses.append(await pipe.train_step(x, y))
        seconds = time.perf_counter() - t0
        trace = await pipe.timeline()
    finally:
        await pipe.stop()
    sent = [s.bytes_sent() for s in trace.steps if s.what == "train"]
    return {"losses": losses, "bytes_per_step": statistics.median(sent),
            "step_ms": seconds / len(data) * 1e3}


async def run(steps: int) -> None:
    stream = gpt.batches(gpt.corpus(), BATCH, GPT["seq"])
    data = [next(stream) for _ in range(steps)]
    results: dict[str | None, dict[str, Any]] = {}
    async with sl.LocalCluster(2) as cluster:
        for wire_dtype in WIRE_DTYPES:
            results[wire_dtype] = await train(cluster, wire_dtype, data)
    base = results[None]
    base_final = statistics.fmean(base["losses"][-10:])
    for wire_dtype, r in results.items():
        final = statistics.fmean(r["losses"][-10:])
        emit(bench="wire", wire_dtype=wire_dtype or "none", steps=steps,
             final_loss=round(final, 4), final_loss_ratio=round(final / base_final, 4),
             bytes_per_step=int(r["bytes_per_step"]),
             bytes_ratio=round(r["bytes_per_step"] / base["bytes_per_step"], 3),
             step_ms=round(r["step_ms"], 1),
             loss_curve=[round(v, 3) for v in r["losses"][::max(1, steps // 10)]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    opts = parser.parse_args()
    sl.run(run(opts.steps))


if __name__ == "__main__":
    main()
