"""``shardline node``: a worker node in the foreground until SIGINT/SIGTERM, or, with
``--join``, until the cluster it joined ends."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from dataclasses import dataclass

import anyio

from ._errors import ClusterTimeout, JoinRefused, ShardlineError, Unauthorized
from ._runtime import run
from .actors import Node
from .actors._formation import resolves_to_loopback
from .actors._hostinfo import describe, local_rank_from_env
from .actors._join import join
from .transport import load_allow_keys, parse_tcp, split_key

__all__ = ["join_listen_address", "run_node", "server_key"]

# Exit statuses of a joined worker.
LEFT, DRIVER_LOST, REFUSED = 0, 1, 2


@dataclass
class _Joining:
    driver: str
    rank: int | None
    timeout: float
    status: int = LEFT


def server_key(value: str) -> str:
    """``--server-key``: a 40-character Z85 key, or a ``.key`` file holding one."""
    keys = load_allow_keys([value])
    if len(keys) != 1:
        raise ValueError(f"--server-key {value!r} holds {len(keys)} keys, expected one")
    return keys[0]


def join_listen_address(driver: str) -> str:
    """Where a joining worker listens when not told: loopback for a loopback driver,
    every interface otherwise (then it needs keys or --insecure)."""
    host, _ = parse_tcp(driver)
    return "tcp://127.0.0.1:0" if resolves_to_loopback(host) else "tcp://0.0.0.0:0"


def run_node(args: argparse.Namespace) -> int:
    problem = _conflicting(args)
    if problem:
        sys.stderr.write(f"shardline node: {problem} (see 'shardline node --help')\n")
        return 2
    # As ``python -m`` would: ``--allow myapp.actors`` finds ./myapp/actors.py. The
    # console script's own directory is sys.path[0] instead.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    joining = None
    allow_keys = list(args.allow_keys)
    listen = args.listen or os.environ.get("SHARDLINE_LISTEN") or "tcp://127.0.0.1:0"
    try:
        if args.join:
            base, key = split_key(args.join)
            key = server_key(args.server_key) if args.server_key else key
            parse_tcp(base)
            if key is not None:
                allow_keys.append(key)  # the driver connects back to this node
            driver = f"{base};key={key}" if key else base
            joining = _Joining(driver, args.rank, args.join_timeout)
            if not args.listen and not os.environ.get("SHARDLINE_LISTEN"):
                listen = join_listen_address(base)
        node = Node(listen, allow=args.allow, advertise=args.advertise, keys=args.keys,
                    allow_keys=allow_keys, insecure=args.insecure,
                    peer_timeout=args.peer_timeout, max_frame_size=args.max_frame_size,
                    max_header_size=args.max_header_size, max_frames=args.max_frames,
                    metrics=args.metrics_port is not None)
        node.info.update(describe(rank=args.rank, local_rank=local_rank_from_env(os.environ)))
    except (OSError, ValueError, ImportError) as exc:
        sys.stderr.write(f"shardline node: {exc}\n")
        return 2
    if args.keys and not args.allow_keys and not args.join:
        sys.stderr.write(f"shardline node: warning: --keys without --allow-keys: only "
                         f"clients holding the keypair in {args.keys} can connect; list "
                         "the others' public keys with --allow-keys\n")
    try:
        return run(_serve(node, args.exit_with_parent, args.metrics_port, joining))
    except Exception as exc:  # one line saying what, never a traceback
        sys.stderr.write(f"shardline node: {_describe(exc)}\n")
        return 2


def _conflicting(args: argparse.Namespace) -> str | None:
    """Options that make no sense together: refused before anything starts."""
    if args.allow_keys and not args.keys:
        return ("--allow-keys needs --keys: without a keypair the node runs without CURVE "
                "and accepts every client in plaintext")
    if not args.join:
        for flag, value in (("--server-key", args.server_key), ("--rank", args.rank)):
            if value is not None:
                return f"{flag} only applies with --join ADDR"
    return None


def _describe(exc: BaseException) -> str:
    # A task group wraps what failed inside it; the user wants the failure itself.
    while isinstance(exc, Exception) and len(getattr(exc, "exceptions", ())) == 1:
        exc = exc.exceptions[0]  # type: ignore[attr-defined]
    if isinstance(exc, (OSError, ValueError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


async def _serve(node: Node, exit_with_parent: bool, metrics_port: int | None,
                 joining: _Joining | None) -> int:
    parent = os.getppid()
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with node, anyio.create_task_group() as tg:
            extra = ""
            if node.metrics is not None and metrics_port is not None:
                try:
                    port = node.metrics.serve(metrics_port)
                except OSError as exc:
                    raise OSError(f"cannot serve metrics on port {metrics_port}: "
                                  f"{exc.strerror or exc}") from None
                extra = f" metrics=http://127.0.0.1:{port}/metrics"
            # The first line of stdout is the contract LocalCluster and scripts read.
            sys.stdout.write(f"shardline node {node.address} id={node.node_id}{extra}\n")
            sys.stdout.flush()
            if exit_with_parent:
                tg.start_soon(_exit_with_parent, parent, tg.cancel_scope)
            if joining is not None:
                tg.start_soon(_member, node, joining, tg.cancel_scope)
            async for _ in signals:
                break
            tg.cancel_scope.cancel()
    return joining.status if joining is not None else 0


async def _member(node: Node, joining: _Joining, scope: anyio.CancelScope) -> None:
    """Join, stay until the cluster ends, then end this node."""
    try:
        membership = await join(node, joining.driver, rank=joining.rank,
                                timeout=joining.timeout)
    except JoinRefused as exc:
        sys.stderr.write(f"shardline node: {exc}\n")
        joining.status = LEFT if exc.ended else REFUSED
        scope.cancel()
        return
    except (ClusterTimeout, Unauthorized, ShardlineError) as exc:
        sys.stderr.write(f"shardline node: {type(exc).__name__}: {exc}\n")
        joining.status = REFUSED
        scope.cancel()
        return
    sys.stdout.write(f"shardline node joined {split_key(joining.driver)[0]} as rank "
                     f"{membership.rank} of {membership.world_size}\n")
    sys.stdout.flush()
    why, lost = await membership.wait_end()
    if lost:
        sys.stderr.write(f"shardline node: {why}; exiting\n")
        joining.status = DRIVER_LOST
    scope.cancel()


async def _exit_with_parent(parent: int, scope: anyio.CancelScope) -> None:
    # Orphans are re-parented: a changed parent pid means the driver is gone. Nothing
    # signals that portably, hence the poll.
    while os.getppid() == parent:  # noqa: ASYNC110
        await anyio.sleep(0.5)
    scope.cancel()
