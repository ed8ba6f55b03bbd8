"""Data parallel x pipeline parallel, each figure with its baseline from the same run.

    python -m bench.data_parallel [--steps 5] [--skip-torch]

(a) Scaling: 2 stages whose forward/backward sleep 10/20 ms (the device is busy, the CPU
    is free); R = 2 replicas on 4 workers with twice the batch against R = 1 on 2
    workers. Ideal: the same step time for twice the samples (``efficiency`` 1.0).
(b) The all-reduce of a 64 MiB gradient between 2 processes: shardline's path (buckets
    flattened, reduced, averaged and written back to the gradients) against
    ``ProcessGroupGloo.allreduce`` alone on one flat tensor, in the same processes,
    taking turns.
(c) The demo's GPT, 2 replicas x 2 stages in 4 processes, 1F1B, against torch's own
    answer on the same 4 processes: DistributedDataParallel around each stage module of
    torch.distributed.pipelining (Schedule1F1B), gloo, the same global batch.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import torch
from torch import nn

import shardline as sl
from bench._common import emit, run_torch_ranks
from bench.pipeline import step_times
from shardline.models import LayerSpec, Pipeline, gpt
from shardline.models._allreduce import GradSync, join_group, master_store

FORWARD_S, BACKWARD_S = 0.010, 0.020
GPT = {"blocks": 4, "dim": 128, "heads": 4, "seq": 64, "vocab": 256}
BATCH, MICRO = 16, 4  # per replica
MIB64 = 16 << 20      # float32 elements


async def scaling(steps: int) -> None:
    spec = LayerSpec("bench.pipeline:nap_layers",
                     {"forward_s": FORWARD_S, "backward_s": BACKWARD_S}, 2)
    kwargs: dict[str, Any] = {"microbatches": 4, "loss_fn": "torch.nn.functional:mse_loss",
                              "optimizer": ("torch.optim.SGD", {"lr": 0.0})}
    async with sl.LocalCluster(4, allow=["bench"]) as cluster:
        a, b, c, d = cluster.nodes
        one = await Pipeline.start(cluster.node, spec, placement=[a, b], **kwargs)
        two = await Pipeline.start(cluster.node, spec, replicas=2, placement=[[a, b], [c, d]],
                                   **kwargs)
        x, y = torch.randn(8, 16), torch.randn(8, 16)
        xx, yy = torch.randn(16, 16), torch.randn(16, 16)
        t1, t2 = [], []
        for _ in range(3):  # taking turns
            t1.append(statistics.median(await step_times(one, x, y, steps)))
            t2.append(statistics.median(await step_times(two, xx, yy, steps)))
        await one.stop()
        await two.stop()
    r1, r2 = statistics.median(t1), statistics.median(t2)
    emit(bench="data_parallel", metric="scaling_sleeping_stages", stages=2, microbatches=4,
         forward_ms=FORWARD_S * 1e3, backward_ms=BACKWARD_S * 1e3,
         r1_step_ms=round(r1 * 1e3, 1), r2_step_ms=round(r2 * 1e3, 1),
         ratio=round(r2 / r1, 3), efficiency=round(r1 / r2, 3))


class AllReduceBench(sl.Actor):
    """One process's side of (b): a 64 MiB "parameter" with a gradient, both paths."""

    async def join(self, host: str, port: int, rank: int) -> None:
        self.group = await sl.to_thread(join_group, host, port, "bench", rank, 2, "cpu",
                                        "127.0.0.1", 60.0)
        self.param = nn.Parameter(torch.zeros(MIB64))
        self.param.grad = torch.full((MIB64,), float(rank + 1))
        self.sync = GradSync({0: [self.param]}, self.group, 2, 60.0)
        self.flat = torch.ones(MIB64)

    async def ours(self, rounds: int) -> float:
        def run() -> float:
            times = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                self.sync.arm(0)
                self.sync.flush(0)
                self.sync.wait()
                times.append(time.perf_counter() - t0)
            return statistics.median(times)
        return await sl.to_thread(run)

    async def gloo(self, rounds: int) -> float:
        def run() -> float:
            times = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                self.group.allreduce([self.flat]).wait()
                times.append(time.perf_counter() - t0)
            return statistics.median(times)
        return await sl.to_thread(run)


async def allreduce(rounds: int) -> None:
    import anyio

    store = master_store("127.0.0.1", 60.0)
    async with sl.LocalCluster(2, allow=["bench"]) as cluster:
        actors = [await n.spawn("bench.data_parallel:AllReduceBench") for n in cluster.nodes]
        async with anyio.create_task_group() as tg:
            for rank, actor in enumerate(actors):
                tg.start_soon(actor.join, "127.0.0.1", int(store.port), rank)
        ours: list[float] = []
        theirs: list[float] = []
        for _ in range(3):
            for method, out in (("gloo", theirs), ("ours", ours)):
                results: list[float] = []

                async def one(actor: sl.ActorRef, method: str = method,
                              results: list[float] = results) -> None:
                    results.append(await actor.ask(method, rounds))

                async with anyio.create_task_group() as tg:
                    for actor in actors:
                        tg.start_soon(one, actor)
                out.append(max(results))
    base, mine = statistics.median(theirs), statistics.median(ours)
    emit(bench="data_parallel", metric="allreduce_64mib_2proc", gloo_ms=round(base * 1e3, 1),
         shardline_ms=round(mine * 1e3, 1), ratio=round(mine / base, 3))


def gpt_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return (torch.randint(0, GPT["vocab"], (2 * BATCH, GPT["seq"]), generator=gen),
            torch.randint(0, GPT["vocab"], (2 * BATCH, GPT["seq"]), generator=gen))


async def gpt_dp(steps: int, rounds: int) -> None:
    x, y = gpt_batch()
    ours: list[float] = []
    theirs: list[float] = []
    env = {"OMP_NUM_THREADS": "1"}
    async with sl.LocalCluster(4, env=env) as cluster:
        a, b, c, d = cluster.nodes
        pipe = await Pipeline.start(cluster.node, gpt.spec(GPT), replicas=2,
                                    placement=[[a, b], [c, d]], microbatches=MICRO,
                                    loss_fn="shardline.models.gpt:loss",
                                    optimizer=("torch.optim.SGD", {"lr": 0.01}))
        for _ in range(rounds):
            theirs.append(await sl.to_thread(gpt_torch, steps))
            ours.append(statistics.median(await step_times(pipe, x, y, steps)))
        await pipe.stop()
    base, mine = statistics.median(theirs), statistics.median(ours)
    emit(bench="data_parallel", metric="gpt_2x2_1f1b_step_ms", config=GPT,
         batch=2 * BATCH, microbatches=MICRO, torch_ddp_pipelining_ms=round(base * 1e3, 1),
         shardline_ms=round(mine * 1e3, 1), ratio=round(mine / base, 3))


def torch_rank(rank: int, port: int, steps: int) -> None:
    """One of 4 ranks: pipeline rank ``rank % 2`` of data-parallel replica ``rank // 2``."""
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=4)
    pp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    dp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    replica, index = divmod(rank, 2)
    n = gpt.n_layers(GPT)
    half = n // 2
    module = gpt.layers(GPT, 0, half) if index == 0 else gpt.layers(GPT, half, n)
    ddp = DistributedDataParallel(module, process_group=dp_groups[index])
    stage = PipelineStage(ddp, index, 2, torch.device("cpu"), group=pp_groups[replica])
    schedule = Schedule1F1B(stage, MICRO, loss_fn=gpt.loss)
    opt = torch.optim.SGD(module.parameters(), lr=0.01)
    x, y = gpt_batch()
    rows = slice(replica * BATCH, (replica + 1) * BATCH)
    times = []
    for i in range(steps + 1):
        dist.barrier()
        t0 = time.perf_counter()
        opt.zero_grad()
        if index == 0:
            schedule.step(x[rows])
        else:
            schedule.step(target=y[rows], losses=[])
        opt.step()
        dist.barrier()
        if i:
            times.append(time.perf_counter() - t0)
    if rank == 0:
        sys.stdout.write(f"{statistics.median(times)}\n")
    dist.destroy_process_group()


def gpt_torch(steps: int) -> float:
    return run_torch_ranks("bench.data_parallel", 4, ["--steps", str(steps)],
                           {"OMP_NUM_THREADS": "1"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="turns each system takes")
    parser.add_argument("--skip-torch", action="store_true", help="parts (a) and (b) only")
    parser.add_argument("--torch-rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.torch_rank is not None:
        torch_rank(opts.torch_rank, opts.port, opts.steps)
        return
    sl.run(scaling(opts.steps))
    sl.run(allreduce(opts.steps))
    if not opts.skip_torch:
        sl.run(gpt_dp(opts.steps, opts.rounds))


if __name__ == "__main__":
    main()
