"""``shardline node``: a worker node in the foreground until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import os
import signal
import sys

import anyio

from ._runtime import run
from .actors import Node

__all__ = ["run_node"]


def run_node(args: argparse.Namespace) -> int:
    try:
        node = Node(args.listen, allow=args.allow, advertise=args.advertise, keys=args.keys,
                    allow_keys=args.allow_keys, insecure=args.insecure,
                    peer_timeout=args.peer_timeout, max_frame_size=args.max_frame_size,
                    max_header_size=args.max_header_size, max_frames=args.max_frames,
                    metrics=args.metrics_port is not None)
    except (OSError, ValueError, ImportError) as exc:
        sys.stderr.write(f"shardline node: {exc}\n")
        return 2
    try:
        run(_serve(node, args.exit_with_parent, args.metrics_port))
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"shardline node: {exc}\n")
        return 2
    except Exception as exc:  # Unauthorized and friends: say what, not a traceback
        sys.stderr.write(f"shardline node: {type(exc).__name__}: {exc}\n")
        return 2
    return 0


async def _serve(node: Node, exit_with_parent: bool, metrics_port: int | None) -> None:
    parent = os.getppid()
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with node, anyio.create_task_group() as tg:
            extra = ""
            if node.metrics is not None and metrics_port is not None:
                port = node.metrics.serve(metrics_port)
                extra = f" metrics=http://127.0.0.1:{port}/metrics"
            # The first line of stdout is the contract LocalCluster and scripts read.
            sys.stdout.write(f"shardline node {node.address} id={node.node_id}{extra}\n")
            sys.stdout.flush()
            if exit_with_parent:
                tg.start_soon(_exit_with_parent, parent, tg.cancel_scope)
            async for _ in signals:
                break
            tg.cancel_scope.cancel()


async def _exit_with_parent(parent: int, scope: anyio.CancelScope) -> None:
    # Orphans are re-parented: a changed parent pid means the driver is gone. Nothing
    # signals that portably, hence the poll.
    while os.getppid() == parent:  # noqa: ASYNC110
        await anyio.sleep(0.5)
    scope.cancel()
