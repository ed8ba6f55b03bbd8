"""Train the small GPT of examples/train_gpt.py as a pipeline over every rank of a job.

Start it on every rank with ``shardline run`` (under srun, torchrun, mpirun or a
Kubernetes StatefulSet): rank 0 runs this script and drives; every other rank joins as
a worker and holds one pipeline stage, on its own GPU when it has one (``cuda:{local
rank}``), else on its CPU. See train.sbatch, and docs/clusters.md.
"""

from __future__ import annotations

import argparse
import time

import shardline as sl
from shardline.models import Pipeline, gpt


async def main(opts: argparse.Namespace) -> None:
    config = {"blocks": opts.blocks, "dim": opts.dim, "heads": 4, "seq": opts.seq,
              "vocab": 256}
    stream = gpt.batches(gpt.corpus(), opts.batch, opts.seq)
    async with sl.Cluster.from_env(timeout=opts.join_timeout) as cluster:
        # One stage per worker rank, each on the last device it lists: its GPU if it
        # has one, else "cpu".
        placement = [(node, node.devices[-1]) for node in cluster.nodes]
        for node, device in placement:
            print(f"stage on rank {node.rank}: {node.host} pid {node.pid} {device}")
        pipe = await Pipeline.start(
            cluster.node, gpt.spec(config), placement=placement, schedule=opts.schedule,
            microbatches=opts.microbatches, loss_fn="shardline.models.gpt:loss",
            optimizer=("torch.optim.AdamW", {"lr": opts.lr}))
        first = last = 0.0
        for step in range(1, opts.steps + 1):
            x, y = next(stream)
            t0 = time.perf_counter()
            last = await pipe.train_step(x, y)
            first = first or last
            print(f"step {step}/{opts.steps} loss {last:.3f} "
                  f"{(time.perf_counter() - t0) * 1e3:.0f} ms", flush=True)
        await pipe.save(opts.out)
        print(f"loss {first:.3f} -> {last:.3f}; checkpoint in {opts.out}/")
        await pipe.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--schedule", default="1f1b")
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", default="checkpoints/gpt")
    parser.add_argument("--join-timeout", type=float, default=120.0,
                        help="seconds to wait for every worker rank to join")
    sl.run(main(parser.parse_args()))
