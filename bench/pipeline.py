"""Pipeline benchmarks, each with its baseline measured in the same run.

    python -m bench.pipeline [--steps 5] [--skip-torch]

(a) Scheduler overhead: 4 stages in 4 worker processes whose forward/backward sleep
    10 ms / 20 ms off the event loop (the device is busy, the CPU is free), m=8; measured
    step time vs the simulator's ideal makespan, for GPipe and 1F1B. ``ratio`` compares
    each step with the simulator's makespan for the forward/backward durations that step
    measured (from its trace), so it counts scheduling and communication only;
    ``ratio_nominal`` compares with the nominal 10/20 ms, which no system can reach
    here: ``time.sleep(0.010)`` alone overshoots by ~0.2 ms on these VMs, and code
    right after a sleep runs several times slower while the idle vCPU warms up.
(b) The small GPT, 2 stages in 2 processes, 1F1B, against torch.distributed.pipelining
    (Schedule1F1B, gloo, 2 processes) on the same batch: step time ratio. The two
    systems take turns (``--rounds``), so a noisy neighbour hits both alike.
(c) Zero-bubble schedules on sleeping layers whose forward, input gradient and weight
    gradient each take the same time (F = I = W; 1F1B runs I and W together as B),
    4 processes, m = 8: each step against 1F1B's (theory: ZB-H1 27/33 = 0.82, ZBV
    25.5/33) and against its own simulated makespan for the durations it measured.
(d) The small GPT on 2 processes with each zero-bubble schedule against torch
    pipelining's implementation of the same schedule (ScheduleInterleavedZeroBubble
    with one stage per rank for ZB-H1, ScheduleZBVZeroBubble, ScheduleDualPipeV).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import torch
from torch import nn

import shardline as sl
from bench._common import emit, run_torch_ranks
from shardline.models import LayerSpec, Pipeline, gpt, schedules

FORWARD_S, BACKWARD_S = 0.010, 0.020
GPT = {"blocks": 4, "dim": 128, "heads": 4, "seq": 64, "vocab": 256}
BATCH, MICRO = 16, 4


class _Nap(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, fwd: float, bwd: float) -> torch.Tensor:
        time.sleep(fwd)
        ctx.bwd = bwd
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        time.sleep(ctx.bwd)
        return grad, None, None


class Nap(nn.Module):
    def __init__(self, fwd: float, bwd: float) -> None:
        super().__init__()
        self.fwd, self.bwd = fwd, bwd
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Nap.apply(x * self.w, self.fwd, self.bwd)  # type: ignore[no-any-return]


def nap_layers(config: dict[str, Any], start: int, end: int) -> nn.Sequential:
    return nn.Sequential(*(Nap(config["forward_s"], config["backward_s"])
                           for _ in range(start, end)))


class _SleepInput(torch.autograd.Function):
    """Forward sleeps F; its backward (on the input-gradient path) sleeps I."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, fwd: float, inp: float) -> torch.Tensor:
        time.sleep(fwd)
        ctx.inp = inp
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        time.sleep(ctx.inp)
        return grad, None, None


class _SleepWeight(torch.autograd.Function):
    """Identity on the weight; its backward, reached only by the weight gradient,
    sleeps W."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, wgt: float) -> torch.Tensor:
        ctx.wgt = wgt
        return w.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        time.sleep(ctx.wgt)
        return grad, None


class SplitNap(nn.Module):
    def __init__(self, fwd: float, inp: float, wgt: float) -> None:
        super().__init__()
        self.fwd, self.inp, self.wgt = fwd, inp, wgt
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _SleepInput.apply(x, self.fwd, self.inp)
        return h * _SleepWeight.apply(self.w, self.wgt)  # type: ignore[no-any-return]


def split_nap_layers(config: dict[str, Any], start: int, end: int) -> nn.Sequential:
    return nn.Sequential(*(SplitNap(config["forward_s"], config["input_s"],
                                    config["weight_s"]) for _ in range(start, end)))


async def step_times(pipe: Pipeline, x: Any, y: Any, steps: int) -> list[float]:
    await pipe.train_step(x, y)  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        await pipe.train_step(x, y)
        times.append(time.perf_counter() - t0)
    return times


async def overhead(steps: int) -> None:
    p, m = 4, 8
    spec = LayerSpec("bench.pipeline:nap_layers",
                     {"forward_s": FORWARD_S, "backward_s": BACKWARD_S}, p)
    x, y = torch.randn(m * 2, 16), torch.randn(m * 2, 16)
    async with sl.LocalCluster(p, allow=["bench"]) as cluster:
        for name in ("gpipe", "1f1b"):
            schedule = schedules.by_name(name, p, m)
            nominal = schedules.simulate(schedule, FORWARD_S, BACKWARD_S).makespan
            pipe = await Pipeline.start(cluster.node, spec, placement=cluster.nodes,
                                        schedule=name, microbatches=m,
                                        loss_fn="torch.nn.functional:mse_loss",
                                        optimizer=("torch.optim.SGD", {"lr": 0.0}),
                                        trace=True)
            times = await step_times(pipe, x, y, steps)
            trace = await pipe.timeline()
            await pipe.stop()
            recorded = trace.steps[1:]  # the first is the warm-up
            ideals = [schedules.simulate(schedule, durations=t.durations()).makespan
                      for t in recorded]
            durations = [d for t in recorded for d in t.durations().items()]
            measured = statistics.median(times)
            emit(bench="pipeline", metric=f"step_vs_ideal_{name}", stages=p, microbatches=m,
                 forward_ms=FORWARD_S * 1e3, backward_ms=BACKWARD_S * 1e3,
                 measured_forward_ms=_median_ms(v for (_, k, _), v in durations if k == "F"),
                 measured_backward_ms=_median_ms(v for (_, k, _), v in durations if k == "B"),
                 ideal_ms=round(statistics.median(ideals) * 1e3, 1),
                 nominal_ideal_ms=round(nominal * 1e3, 1),
                 shardline_ms=round(measured * 1e3, 1),
                 ratio=round(statistics.median(t / i for t, i in zip(times, ideals,
                                                                      strict=True)), 3),
                 ratio_nominal=round(measured / nominal, 3))


async def zero_bubble(steps: int, unit: float) -> None:
    """(c): 8 layers of unit / 2 each way, so a stage of 4 devices' pipelines costs one
    unit per F, I and W, and a stage of ZBV's 8 (two per device) half of that."""
    p, m, n = 4, 8, 8
    spec = LayerSpec("bench.pipeline:split_nap_layers",
                     {"forward_s": unit / 2, "input_s": unit / 2, "weight_s": unit / 2}, n)
    x, y = torch.randn(m * 2, 16), torch.randn(m * 2, 16)
    results: dict[str, float] = {}
    async with sl.LocalCluster(p, allow=["bench"]) as cluster:
        for name in ("1f1b", "zb-h1", "zbv"):
            schedule = schedules.by_name(name, p, m)
            pipe = await Pipeline.start(cluster.node, spec, placement=cluster.nodes,
                                        schedule=name, microbatches=m,
                                        loss_fn="torch.nn.functional:mse_loss",
                                        optimizer=("torch.optim.SGD", {"lr": 0.0}),
                                        trace=True)
            times = await step_times(pipe, x, y, steps)
            trace = await pipe.timeline()
            await pipe.stop()
            ideals = [schedules.simulate(schedule, durations=t.durations()).makespan
                      for t in trace.steps[1:]]
            nominal = schedules.simulate(schedule, unit, unit, weight_cost=unit).makespan
            results[name] = statistics.median(times)
            emit(bench="pipeline", metric=f"zero_bubble_{name}", stages=p, microbatches=m,
                 unit_ms=unit * 1e3, shardline_ms=round(results[name] * 1e3, 1),
                 ideal_ms=round(statistics.median(ideals) * 1e3, 1),
                 nominal_ideal_ms=round(nominal * 1e3, 1),
                 ratio=round(statistics.median(t / i for t, i in zip(times, ideals,
                                                                      strict=True)), 3),
                 vs_1f1b=round(results[name] / results["1f1b"], 3))


def _median_ms(values: Any) -> float:
    return round(statistics.median(values) * 1e3, 2)


def gpt_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return (torch.randint(0, GPT["vocab"], (BATCH, GPT["seq"]), generator=gen),
            torch.randint(0, GPT["vocab"], (BATCH, GPT["seq"]), generator=gen))


def stage_env(threads: int) -> dict[str, str]:
    """Intra-op threads per stage process, the same for both systems."""
    return {"OMP_NUM_THREADS": str(threads)}


async def gpt_versus_torch(steps: int, threads: int, rounds: int,
                           schedule: str = "1f1b") -> tuple[float, float]:
    """Median step times (torch.distributed.pipelining, shardline), taking turns."""
    x, y = gpt_batch()
    ours: list[float] = []
    theirs: list[float] = []
    async with sl.LocalCluster(2, env=stage_env(threads)) as cluster:
        pipe = await Pipeline.start(cluster.node, gpt.spec(GPT), placement=cluster.nodes,
                                    schedule=schedule, microbatches=MICRO,
                                    loss_fn="shardline.models.gpt:loss",
                                    optimizer=("torch.optim.SGD", {"lr": 0.01}))
        for _ in range(rounds):
            theirs.append(await sl.to_thread(gpt_torch, steps, threads, schedule))
            ours.append(statistics.median(await step_times(pipe, x, y, steps)))
        await pipe.stop()
    return statistics.median(theirs), statistics.median(ours)


def torch_pp_rank(rank: int, port: int, steps: int, schedule_name: str) -> None:
    """One rank of the torch.distributed.pipelining baseline (run as a subprocess), with
    the layers split as shardline splits them for the same schedule."""
    import torch.distributed as dist
    from torch.distributed import pipelining as tpp

    from shardline.models._partition import balanced_bounds

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    ours = schedules.by_name(schedule_name, 2, MICRO)
    n = gpt.n_layers(GPT)
    bounds = balanced_bounds([1.0] * n, ours.n_stages)
    held = [s for s in range(ours.n_stages) if ours.device_of(s) == rank]
    modules = [gpt.layers(GPT, *bounds[s]) for s in held]
    stages = [tpp.PipelineStage(module, s, ours.n_stages, torch.device("cpu"))
              for module, s in zip(modules, held, strict=True)]
    kind: Any = {"1f1b": tpp.Schedule1F1B, "zb-h1": tpp.ScheduleInterleavedZeroBubble,
                 "zbv": tpp.ScheduleZBVZeroBubble, "dualpipev": tpp.ScheduleDualPipeV,
                 }[schedule_name]
    schedule = kind(stages[0] if kind is tpp.Schedule1F1B else stages, MICRO,
                    loss_fn=gpt.loss)
    opt = torch.optim.SGD([p for m in modules for p in m.parameters()], lr=0.01)
    x, y = gpt_batch()
    first, last = 0 in held, ours.n_stages - 1 in held
    times = []
    for i in range(steps + 1):
        dist.barrier()
        t0 = time.perf_counter()
        opt.zero_grad()
        schedule.step(*([x] if first else []),
                      **({"target": y, "losses": []} if last else {}))
        opt.step()
        dist.barrier()
        if i:
            times.append(time.perf_counter() - t0)
    if rank == 0:
        sys.stdout.write(f"{statistics.median(times)}\n")
    dist.destroy_process_group()


def gpt_torch(steps: int, threads: int, schedule: str = "1f1b") -> float:
    return run_torch_ranks("bench.pipeline", 2, ["--steps", str(steps), "--torch-schedule",
                                                 schedule], stage_env(threads))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--skip-torch", action="store_true", help="only part (a)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="turns each system takes in (b)")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1) // 2),
                        help="intra-op threads per stage process in (b), both systems "
                        "(default: the cores split between the two stage processes, as "
                        "LocalCluster does)")
    parser.add_argument("--unit-ms", type=float, default=20.0,
                        help="F = I = W cost of a stage in (c), in ms (default 20)")
    parser.add_argument("--only", choices=["a", "b", "c", "d"], action="append",
                        help="run only these parts (repeatable; default all)")
    parser.add_argument("--zero-bubble", default="zb-h1,zbv,dualpipev",
                        help="the schedules (d) compares, comma-separated "
                        "(default: zb-h1,zbv,dualpipev)")
    parser.add_argument("--torch-rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--torch-schedule", default="1f1b", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.torch_rank is not None:
        torch_pp_rank(opts.torch_rank, opts.port, opts.steps, opts.torch_schedule)
        return
    parts = set(opts.only or "abcd")
    if opts.skip_torch:
        parts -= {"b", "d"}
    if "a" in parts:
        sl.run(overhead(opts.steps))
    if "c" in parts:
        sl.run(zero_bubble(opts.steps, opts.unit_ms / 1e3))
    for schedule in (["1f1b"] if "b" in parts else []) + (
            opts.zero_bubble.split(",") if "d" in parts else []):
        base, ours = sl.run(gpt_versus_torch(opts.steps, opts.threads, opts.rounds,
                                             schedule))
        emit(bench="pipeline", metric=f"gpt_2stage_{schedule}_step_ms", config=GPT,
             batch=BATCH, microbatches=MICRO, threads_per_stage=opts.threads,
             torch_pipelining_ms=round(base * 1e3, 1),
             shardline_ms=round(ours * 1e3, 1), ratio=round(ours / base, 3))


if __name__ == "__main__":
    main()
