"""Train the small GPT across worker processes with pipeline parallelism, and data
parallelism on top with ``--replicas``: R copies of an S-stage pipeline (``--stages``,
default 2) on S x R worker processes, each step's batch split across the copies and
their gradients averaged.

The corpus ships with Python itself (the text of pydoc's help topics), read as bytes,
so there is nothing to download. Run: python examples/train_gpt.py [--steps 200]
[--replicas 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import shardline as sl
from shardline.models import Pipeline, gpt


class Progress:
    """A bar redrawn in place on a terminal; elsewhere (a log file, CI, ``| tee``) a
    plain line every few seconds, so the log is not one enormous line."""

    def __init__(self, total: int, every: float = 5.0) -> None:
        self.total = total
        self.every = every
        self.tty = sys.stdout.isatty()
        self.printed: float | None = None

    def update(self, step: int, loss: float, tokens_per_s: float, step_ms: float) -> None:
        figures = (f"step {step}/{self.total} loss {loss:.3f}  {tokens_per_s:,.0f} tok/s  "
                   f"{step_ms:.0f} ms/step")
        if self.tty:
            done = int(30 * step / self.total)
            sys.stdout.write(f"\r[{'#' * done}{'.' * (30 - done)}] {figures}")
            sys.stdout.flush()
        elif (self.printed is None or time.monotonic() - self.printed >= self.every
              or step == self.total):
            self.printed = time.monotonic()
            print(figures, flush=True)

    def close(self) -> None:
        if self.tty:
            sys.stdout.write("\n")


async def main(opts: argparse.Namespace) -> None:
    config = {"blocks": opts.blocks, "dim": opts.dim, "heads": 4, "seq": opts.seq, "vocab": 256}
    stream = gpt.batches(gpt.corpus(), opts.batch, opts.seq)
    stages, replicas = opts.stages, opts.replicas
    async with sl.LocalCluster(stages * replicas) as cluster:
        # replica r runs on workers r*stages .. r*stages + stages - 1
        rows = [cluster.nodes[r * stages:(r + 1) * stages] for r in range(replicas)]
        pipe = await Pipeline.start(
            cluster.node, gpt.spec(config), replicas=replicas,
            placement=rows if replicas > 1 else rows[0], schedule=opts.schedule,
            microbatches=opts.microbatches, loss_fn="shardline.models.gpt:loss",
            optimizer=("torch.optim.AdamW", {"lr": opts.lr}))
        first = last = 0.0
        progress = Progress(opts.steps)
        for step in range(1, opts.steps + 1):
            x, y = next(stream)
            t0 = time.perf_counter()
            last = await pipe.train_step(x, y)
            dt = time.perf_counter() - t0
            first = first or last
            progress.update(step, last, x.numel() / dt, dt * 1e3)
        progress.close()
        async with pipe.trace() as trace:   # one more step, recorded
            await pipe.train_step(*next(stream))
        trace.to_chrome(f"{opts.out}-timeline.json")
        await pipe.save(opts.out)
        print(f"loss {first:.3f} (step 1) -> {last:.3f} (step {opts.steps}); checkpoint "
              f"in {opts.out}/, one step's timeline in {opts.out}-timeline.json")
        await pipe.stop()


def positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    def check(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text} must be above 0")
        return value
    return check


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    count = positive(int)
    parser.add_argument("--steps", type=count, default=100, help="training steps")
    # --workers: its name before --stages, as shardline demo and serve call it
    parser.add_argument("--stages", "--workers", dest="stages", type=count, default=2,
                        help="pipeline stages, one worker process each")
    parser.add_argument("--replicas", type=count, default=1,
                        help="copies of the pipeline (data parallel); stages x replicas "
                        "worker processes in all")
    parser.add_argument("--schedule", default="1f1b", help="pipeline schedule: "
                        "gpipe, 1f1b, interleaved-1f1b, zb-h1, zbv or dualpipev")
    parser.add_argument("--microbatches", type=count, default=4,
                        help="microbatches per replica and step")
    parser.add_argument("--batch", type=count, default=16, help="sequences per step")
    parser.add_argument("--seq", type=count, default=64, help="tokens (bytes) per sequence")
    parser.add_argument("--dim", type=count, default=128, help="model width")
    parser.add_argument("--blocks", type=count, default=4, help="transformer blocks")
    parser.add_argument("--lr", type=positive(float), default=3e-3, help="AdamW learning rate")
    parser.add_argument("--out", default="checkpoints/gpt", help="checkpoint directory")
    sl.run(main(parser.parse_args()))
