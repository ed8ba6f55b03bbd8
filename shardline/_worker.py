"""``shardline node``: a worker node in the foreground until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
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
                    max_header_size=args.max_header_size, max_frames=args.max_frames)
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"shardline node: {exc}\n")
        return 2
    try:
        run(_serve(node))
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"shardline node: {exc}\n")
        return 2
    except Exception as exc:  # Unauthorized and friends: say what, not a traceback
        sys.stderr.write(f"shardline node: {type(exc).__name__}: {exc}\n")
        return 2
    return 0


async def _serve(node: Node) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with node:
            # The first line of stdout is the contract LocalCluster and scripts read.
            sys.stdout.write(f"shardline node {node.address} id={node.node_id}\n")
            sys.stdout.flush()
            async for _ in signals:
                break
