"""Train the small GPT across worker processes with pipeline parallelism, and data
parallelism on top with ``--replicas``: R copies of a 2-stage pipeline on 2 x R workers,
each step's batch split across them and their gradients averaged.

The corpus ships with Python itself (the text of pydoc's help topics), read as bytes,
so there is nothing to download. Run: python examples/train_gpt.py [--steps 200]
[--replicas 2]
"""

from __future__ import annotations

import argparse
import sys
import time

import shardline as sl
from shardline.models import Pipeline, gpt


def bar(step: int, total: int, loss: float, tokens_per_s: float, step_ms: float) -> None:
    done = int(30 * step / total)
    sys.stdout.write(f"\r[{'#' * done}{'.' * (30 - done)}] step {step}/{total} "
                     f"loss {loss:.3f}  {tokens_per_s:,.0f} tok/s  {step_ms:.0f} ms/step")
    sys.stdout.flush()


async def main(opts: argparse.Namespace) -> None:
    config = {"blocks": opts.blocks, "dim": opts.dim, "heads": 4, "seq": opts.seq, "vocab": 256}
    stream = gpt.batches(gpt.corpus(), opts.batch, opts.seq)
    stages, replicas = opts.workers, opts.replicas
    async with sl.LocalCluster(stages * replicas) as cluster:
        # replica r runs on workers r*stages .. r*stages + stages - 1
        rows = [cluster.nodes[r * stages:(r + 1) * stages] for r in range(replicas)]
        pipe = await Pipeline.start(
            cluster.node, gpt.spec(config), replicas=replicas,
            placement=rows if replicas > 1 else rows[0], schedule=opts.schedule,
            microbatches=opts.microbatches, loss_fn="shardline.models.gpt:loss",
            optimizer=("torch.optim.AdamW", {"lr": opts.lr}))
        first = last = 0.0
        for step in range(1, opts.steps + 1):
            x, y = next(stream)
            t0 = time.perf_counter()
            last = await pipe.train_step(x, y)
            dt = time.perf_counter() - t0
            first = first or last
            bar(step, opts.steps, last, x.numel() / dt, dt * 1e3)
        sys.stdout.write("\n")
        async with pipe.trace() as trace:   # one more step, recorded
            await pipe.train_step(*next(stream))
        trace.to_chrome(f"{opts.out}-timeline.json")
        await pipe.save(opts.out)
        print(f"loss {first:.3f} -> {last:.3f}; checkpoint in {opts.out}/, one step's "
              f"timeline in {opts.out}-timeline.json")
        await pipe.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2, help="stages, one per worker")
    parser.add_argument("--replicas", type=int, default=1,
                        help="copies of the pipeline (data parallel); workers x replicas "
                        "worker processes in all")
    parser.add_argument("--schedule", default="1f1b")
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", default="checkpoints/gpt")
    sl.run(main(parser.parse_args()))
