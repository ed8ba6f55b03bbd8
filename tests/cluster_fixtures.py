"""Actors and a driver script for the cluster tests, importable on every worker."""

from __future__ import annotations

import os
import sys
from typing import Any

import anyio

import shardline as sl


class Fragile(sl.Actor):
    """Ends its own process in the ways the supervision tests tell apart."""

    max_concurrency = 8  # ``exit`` and ``hog`` run while ``hang`` calls wait

    def pid(self) -> int:
        return os.getpid()

    def environ(self, name: str) -> str | None:
        return os.environ.get(name)

    async def hang(self) -> None:
        await anyio.sleep_forever()

    def exit(self, code: int) -> None:
        sys.stdout.flush()
        os._exit(code)

    def hog(self, mib: int) -> int:
        """Touch ``mib`` MiB, one page at a time (an OOM kill, under a memory limit)."""
        blocks: list[Any] = []
        for _ in range(mib):
            block = bytearray(1 << 20)
            block[::4096] = b"x" * len(block[::4096])
            blocks.append(block)
        return len(blocks)


async def _drive(address: str, expect: int, ready: str) -> None:
    async with sl.Cluster(expect=expect, listen=address, timeout=30.0) as cluster:
        with open(ready, "w") as f:
            f.write(" ".join(n.address for n in cluster.nodes))
        await anyio.sleep_forever()


async def _pipeline(address: str, keys: str, worker_key: str, result: str) -> None:
    """Drive a 3-stage pipeline over 3 joined workers; check it against the unsharded
    model (tests/test_pipeline.py's definition), then write what was seen."""
    from shardline.models import Pipeline
    from tests.test_pipeline import check_equal, spec

    from . import models_fixtures

    async with sl.Cluster(expect=3, listen=address, keys=keys, allow_keys=[worker_key],
                          timeout=60.0) as cluster:
        opt = ("torch.optim.SGD", {"lr": 0.1})
        pipe = await Pipeline.start(cluster.node, spec(n=6), stages=3,
                                    placement=cluster.nodes, schedule="1f1b",
                                    microbatches=2,
                                    loss_fn="torch.nn.functional:cross_entropy",
                                    optimizer=opt)
        reference = models_fixtures.layers({"kind": "mlp", "n": 6}, 0, 6)
        await check_equal(pipe, reference, opt, 2)
        await pipe.stop()
        with open(result, "w") as f:
            f.write(" ".join(f"{n.rank}@{n.address.split(';')[0]}" for n in cluster.nodes))


if __name__ == "__main__":
    # python -m tests.cluster_fixtures drive ADDRESS EXPECT READY_FILE: a driver that
    #   forms a cluster, writes its workers' addresses to READY_FILE, waits to be killed.
    # python -m tests.cluster_fixtures pipeline ADDRESS KEYS WORKER_KEY RESULT_FILE
    if sys.argv[1] == "drive":
        sl.run(_drive(sys.argv[2], int(sys.argv[3]), sys.argv[4]))
    else:
        sl.run(_pipeline(*sys.argv[2:6]))
