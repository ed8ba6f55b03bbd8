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
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from ._argtypes import at_least, positive_float

__all__ = ["Progress", "add_arguments", "demo_command"]

# The demo's model: small enough to train visibly on two CPU cores in a minute.
CONFIG: dict[str, Any] = {"blocks": 4, "dim": 128, "heads": 4, "seq": 64, "vocab": 256}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stages", type=at_least(1), default=2,
                        help="pipeline stages, i.e. devices per copy of the pipeline "
                        "(default 2; the model has 6 layers to split)")
    parser.add_argument("--workers", type=at_least(0), default=None,
                        help="worker processes the devices are spread over (default: one "
                        "per stage and replica; 0: every stage in this process)")
    parser.add_argument("--replicas", type=at_least(1), default=1,
                        help="copies of the pipeline, each step's batch split across them "
                        "and their gradients averaged (default 1)")
    parser.add_argument("--schedule", default="1f1b",
                        help="gpipe, 1f1b, interleaved-1f1b, zb-h1, zbv or dualpipev "
                        "(default 1f1b)")
    parser.add_argument("--microbatches", type=at_least(1), default=4,
                        help="pieces each replica's share of a batch is cut into, which "
                        "flow through the stages one behind the other (default 4)")
    parser.add_argument("--seconds", type=positive_float, default=60.0,
                        help="how long to train (default 60)")
    parser.add_argument("--steps", type=at_least(1), default=None,
                        help="stop after this many steps instead of after --seconds "
                        "(default: train for --seconds)")
    parser.add_argument("--batch", type=at_least(1), default=16,
                        help="sequences of 64 bytes per training step; at least "
                        "--microbatches x --replicas (default 16)")
    parser.add_argument("--out", default="shardline-demo",
                        help="where the checkpoint and the timeline go (default "
                        "./shardline-demo)")


def demo_command(args: argparse.Namespace) -> int:
    from . import run

    problem = check(args)
    if problem is None:
        try:
            Path(args.out).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            problem = f"cannot write to --out {args.out}: {exc.strerror or exc}"
    if problem is not None:
        sys.stderr.write(f"shardline demo: {problem} (see 'shardline demo --help')\n")
        return 2
    devices = args.stages * args.replicas
    if args.workers is not None and args.workers > devices:
        sys.stderr.write(f"shardline demo: warning: {devices} device(s) ({args.stages} "
                         f"stages x {args.replicas} replicas) need at most {devices} "
                         f"workers; starting {devices}, not {args.workers}\n")
        args.workers = devices
    try:
        run(_demo(args, sys.stdout))
    except KeyboardInterrupt:
        sys.stdout.write("\ninterrupted; workers stopped\n")
        return 130
    return 0


def check(args: argparse.Namespace) -> str | None:
    """What is wrong with the demo's options, before any process starts; None if nothing."""
    from .models import gpt, schedules

    chunks = 2 if args.schedule.lower().startswith("interleaved") else 1
    try:
        schedule = schedules.by_name(args.schedule, args.stages, args.microbatches, chunks)
    except ValueError as exc:
        return f"--schedule {args.schedule}: {exc}"
    layers = gpt.n_layers(CONFIG)
    if schedule.n_stages > layers:
        per = f" ({schedule.chunks} per device)" if schedule.chunks > 1 else ""
        return (f"--stages {args.stages} with {args.schedule} makes {schedule.n_stages} "
                f"pipeline stages{per}, but the model has only {layers} layers: use "
                f"--stages {layers // schedule.chunks} or fewer")
    if args.batch < args.microbatches * args.replicas:
        return (f"--batch {args.batch} cannot be cut into {args.microbatches} microbatches "
                f"for each of {args.replicas} replica(s): use --batch "
                f"{args.microbatches * args.replicas} or more, or fewer --microbatches")
    return None


class Progress:
    """A training run's progress: on a terminal, one bar redrawn in place; anywhere else
    (a log file, CI, ``| tee``) a plain line every ``every`` seconds and at the end, as
    tqdm and pip do, so a log holds lines rather than one line of every step."""

    def __init__(self, out: TextIO, *, every: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.out = out
        self.every = every
        self.clock = clock
        isatty = getattr(out, "isatty", None)
        self.tty = bool(isatty and isatty())
        self._printed: float | None = None

    def update(self, done: float, step: int, loss: float, tokens_per_s: float,
               step_ms: float) -> None:
        """``done``: the share of the run behind us, 0..1."""
        figures = (f"step {step:4d}  loss {loss:6.3f}  {tokens_per_s:8,.0f} tok/s  "
                   f"{step_ms:5.0f} ms/step")
        if self.tty:
            filled = int(30 * min(done, 1.0))
            self.out.write(f"\r  [{'#' * filled}{'.' * (30 - filled)}] {figures}")
            self.out.flush()
            return
        now = self.clock()
        if self._printed is None or now - self._printed >= self.every or done >= 1.0:
            self._printed = now
            self.out.write(f"  {min(done, 1.0):4.0%}  {figures}\n")
            self.out.flush()

    def close(self) -> None:
        if self.tty:
            self.out.write("\n")


async def _demo(args: argparse.Namespace, out: TextIO) -> None:
    from . import LocalCluster, Node
    from .models import Pipeline, gpt, schedules

    config = CONFIG
    devices = args.stages * args.replicas
    workers = devices if args.workers is None else args.workers
    outdir = Path(args.out)
    stream = gpt.batches(gpt.corpus(), args.batch, int(config["seq"]))
    copies = f" x {args.replicas} replicas" if args.replicas > 1 else ""
    where = f"in {workers} worker processes" if workers else "in this process"
    out.write(f"shardline demo: a {config['blocks']}-block GPT over {args.stages} stages"
              f"{copies} {where}, {args.schedule}, {args.microbatches} microbatches\n")
    started = time.monotonic()
    async with contextlib.AsyncExitStack() as stack:
        if workers:
            cluster = await stack.enter_async_context(LocalCluster(workers))
            node = cluster.node
            places: list[Any] = [cluster.nodes[i % workers] for i in range(devices)]
        else:
            node = await stack.enter_async_context(Node())
            places = ["cpu"] * devices
        rows = [places[r * args.stages:(r + 1) * args.stages] for r in range(args.replicas)]
        pipe = await Pipeline.start(node, gpt.spec(config), replicas=args.replicas,
                                    placement=rows if args.replicas > 1 else rows[0],
                                    schedule=args.schedule, microbatches=args.microbatches,
                                    loss_fn="shardline.models.gpt:loss",
                                    optimizer=("torch.optim.AdamW", {"lr": 3e-3}))
        try:
            length = f"{args.steps} steps" if args.steps else f"{args.seconds:g} s"
            ready = "workers up" if workers else "stages up"
            out.write(f"  {ready} in {time.monotonic() - started:.1f} s; training "
                      f"{length} on Python's own help text\n")
            out.flush()
            losses: list[float] = []
            tokens = 0
            progress = Progress(out)
            train_started = time.monotonic()
            while True:
                x, y = next(stream)
                t0 = time.perf_counter()
                losses.append(await pipe.train_step(x, y))
                dt = time.perf_counter() - t0
                tokens += x.numel()
                elapsed = time.monotonic() - train_started
                done = (len(losses) / args.steps if args.steps else elapsed / args.seconds)
                progress.update(done, len(losses), losses[-1], x.numel() / dt, dt * 1e3)
                if done >= 1.0:
                    break
            tokens_per_s = tokens / (time.monotonic() - train_started)
            progress.close()

            x, y = next(stream)
            async with pipe.trace() as trace:
                await pipe.train_step(x, y)
            step = trace.steps[-1]
            ideal = schedules.simulate(pipe.schedule, durations=step.durations())
            trace.to_chrome(outdir / "timeline.json")
            png: Path | None = outdir / "timeline.png"
            try:
                trace.to_png(outdir / "timeline.png",
                             title=f"one training step, {args.stages} stages, "
                             f"{args.schedule}, {args.microbatches} microbatches")
            except ImportError:
                png = None
            await pipe.save(str(outdir / "checkpoint"))

            out.write("  sampling through the pipeline (temperature 0.8):\n")
            for seed, prompt in enumerate(("The ", "def ", "Python ")):
                ids = list(prompt.encode())
                room = int(config["seq"]) - len(ids)  # the model's context holds both
                new = [t async for t in pipe.generate(ids, room, temperature=0.8,
                                                      seed=seed)]
                text = bytes(ids + new).decode("utf-8", "replace")
                # an untrained model writes control bytes too: keep the terminal sane
                text = "".join(c if c.isprintable() or c.isspace() else "\ufffd"
                               for c in text)
                out.write(f"    | {' '.join(text.split())}\n")
        finally:
            with contextlib.suppress(Exception):
                await pipe.stop()

    out.write("summary\n" + _loss_line(losses) +
              f"  throughput      {tokens_per_s:,.0f} tokens/s\n"
              f"  bubble          {step.bubble_fraction():.0%} measured in one step; the "
              f"schedule's own is {ideal.bubble_fraction:.0%} for those operation times\n"
              f"  step time       {(step.end - step.start) * 1e3:.0f} ms, "
              f"{(step.end - step.start) / ideal.makespan:.2f}x the schedule's makespan\n"
              f"  checkpoint      {outdir / 'checkpoint'}/ (shardline serve --model "
              f"gpt:{outdir / 'checkpoint'})\n"
              f"  timeline        {outdir / 'timeline.json'} (open in https://ui.perfetto.dev)"
              + (f", {png}" if png else " (pip install 'shardline[viz]' for a PNG)") + "\n")


def _loss_line(losses: list[float]) -> str:
    """The loss at the start and at the end, each averaged over a few steps (one step's
    loss is noisy), saying so."""
    k = max(1, min(3, len(losses) // 2))
    first = sum(losses[:k]) / k
    last = sum(losses[-k:]) / k
    if k > 1:
        over = f"mean of the first {k} and of the last {k} steps"
    else:
        over = "first step and last step"
    return (f"  loss            {first:.3f} -> {last:.3f} ({over} of {len(losses)}; "
            f"{(1 - last / first):.0%} lower)\n")
