"""``shardline demo``: the whole system in about a minute, offline.

Starts worker processes, trains the small GPT on text that ships with Python across
them with pipeline parallelism, records a step's timeline, saves a checkpoint, writes
some text through the pipeline and says how it went.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import TextIO

__all__ = ["add_arguments", "demo_command"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stages", type=int, default=2, help="pipeline stages (default 2)")
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes (default: one per stage and replica)")
    parser.add_argument("--replicas", type=int, default=1,
                        help="copies of the pipeline, each step's batch split across them "
                        "and their gradients averaged (default 1)")
    parser.add_argument("--schedule", default="1f1b",
                        help="gpipe | 1f1b | interleaved-1f1b (default 1f1b)")
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=60.0,
                        help="how long to train (default 60)")
    parser.add_argument("--steps", type=int, default=None,
                        help="stop after this many steps instead")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", default="shardline-demo",
                        help="where the checkpoint and the timeline go")


def demo_command(args: argparse.Namespace) -> int:
    from . import run

    if args.stages < 1 or args.microbatches < 1 or args.batch < 1 or args.replicas < 1:
        sys.stderr.write("shardline demo: --stages, --replicas, --microbatches and --batch "
                         "must be >= 1\n")
        return 2
    try:
        run(_demo(args, sys.stdout))
    except KeyboardInterrupt:
        sys.stdout.write("\ninterrupted; workers stopped\n")
        return 130
    return 0


def _bar(out: TextIO, done: float, step: int, loss: float, tokens_per_s: float,
         step_ms: float) -> None:
    filled = int(30 * min(done, 1.0))
    out.write(f"\r  [{'#' * filled}{'.' * (30 - filled)}] step {step:4d}  loss {loss:6.3f}  "
              f"{tokens_per_s:8,.0f} tok/s  {step_ms:5.0f} ms/step")
    out.flush()


async def _demo(args: argparse.Namespace, out: TextIO) -> None:
    from . import LocalCluster
    from .models import Pipeline, gpt, schedules

    config = {"blocks": 4, "dim": 128, "heads": 4, "seq": 64, "vocab": 256}
    devices = args.stages * args.replicas
    workers = args.workers or devices
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 (once, before any work)
    stream = gpt.batches(gpt.corpus(), args.batch, int(config["seq"]))
    copies = f" x {args.replicas} replicas" if args.replicas > 1 else ""
    out.write(f"shardline demo: a {config['blocks']}-block GPT over {args.stages} stages"
              f"{copies} in {workers} worker processes, {args.schedule}, "
              f"{args.microbatches} microbatches\n")
    started = time.monotonic()
    async with LocalCluster(workers) as cluster:
        places = [cluster.nodes[i % workers] for i in range(devices)]
        rows = [places[r * args.stages:(r + 1) * args.stages] for r in range(args.replicas)]
        pipe = await Pipeline.start(cluster.node, gpt.spec(config), replicas=args.replicas,
                                    placement=rows if args.replicas > 1 else rows[0],
                                    schedule=args.schedule, microbatches=args.microbatches,
                                    loss_fn="shardline.models.gpt:loss",
                                    optimizer=("torch.optim.AdamW", {"lr": 3e-3}))
        try:
            length = f"{args.steps} steps" if args.steps else f"{args.seconds:.0f} s"
            out.write(f"  workers up in {time.monotonic() - started:.1f} s; training "
                      f"{length} on Python's own help text\n")
            losses: list[float] = []
            tokens = 0
            train_started = time.monotonic()
            while True:
                x, y = next(stream)
                t0 = time.perf_counter()
                losses.append(await pipe.train_step(x, y))
                dt = time.perf_counter() - t0
                tokens += x.numel()
                elapsed = time.monotonic() - train_started
                done = (len(losses) / args.steps if args.steps else elapsed / args.seconds)
                _bar(out, done, len(losses), losses[-1], x.numel() / dt, dt * 1e3)
                if done >= 1.0:
                    break
            tokens_per_s = tokens / (time.monotonic() - train_started)
            out.write("\n")

            x, y = next(stream)
            async with pipe.trace() as trace:
                await pipe.train_step(x, y)
            step = trace.steps[-1]
            ideal = schedules.simulate(pipe.schedule, durations=step.durations())
            trace.to_chrome(outdir / "timeline.json")
            png = outdir / "timeline.png"
            try:
                trace.to_png(png, title=f"one training step, {args.stages} stages, "
                             f"{args.schedule}, {args.microbatches} microbatches")
            except ImportError:
                png = None  # type: ignore[assignment]
            await pipe.save(str(outdir / "checkpoint"))

            out.write("  sampling through the pipeline (temperature 0.8):\n")
            for seed, prompt in enumerate(("The ", "def ", "Python ")):
                ids = list(prompt.encode())
                room = int(config["seq"]) - len(ids)  # the model's context holds both
                new = [t async for t in pipe.generate(ids, room, temperature=0.8,
                                                      seed=seed)]
                text = bytes(ids + new).decode("utf-8", "replace")
                out.write(f"    | {' '.join(text.split())}\n")
        finally:
            with contextlib.suppress(Exception):
                await pipe.stop()

    first = sum(losses[:3]) / len(losses[:3])
    last = sum(losses[-3:]) / len(losses[-3:])
    out.write(
        "summary\n"
        f"  loss            {first:.3f} -> {last:.3f} over {len(losses)} steps "
        f"({(1 - last / first):.0%} lower)\n"
        f"  throughput      {tokens_per_s:,.0f} tokens/s\n"
        f"  bubble          {step.bubble_fraction():.0%} measured in one step; the "
        f"schedule's own is {ideal.bubble_fraction:.0%} for those operation times\n"
        f"  step time       {(step.end - step.start) * 1e3:.0f} ms, "
        f"{(step.end - step.start) / ideal.makespan:.2f}x the schedule's makespan\n"
        f"  checkpoint      {outdir / 'checkpoint'}/ (shardline serve --model "
        f"gpt:{outdir / 'checkpoint'})\n"
        f"  timeline        {outdir / 'timeline.json'} (open in https://ui.perfetto.dev)"
        + (f", {png}" if png else " (pip install 'shardline[viz]' for a PNG)") + "\n")
