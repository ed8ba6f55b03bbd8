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


if __name__ == "__main__":
    # python -m tests.cluster_fixtures ADDRESS EXPECT READY_FILE: a driver that forms a
    # cluster, writes its workers' addresses to READY_FILE and waits to be killed.
    sl.run(_drive(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
