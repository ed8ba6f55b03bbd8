"""``shardline serve``: a LocalCluster, a pipeline, a batcher and the HTTP API in one
process, until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import contextlib
import gc
import socket
import sys
from collections.abc import AsyncIterator

import anyio

from .. import LocalCluster, Node, run
from .._errors import ShardlineError
from ..models import Pipeline, gpt, minilm
from ..models._checkpoint import checkpoint_spec
from ._cli import MODELS
from ._metrics import ServeMetrics
from ._service import CompletionService, EmbeddingService

__all__ = ["serve_command"]


def serve_command(args: argparse.Namespace) -> int:
    name, _, checkpoint = args.model.partition(":")
    if name not in MODELS or (checkpoint and name != "gpt"):
        sys.stderr.write(f"shardline serve: unknown model {args.model!r} "
                         "(minilm, gpt or gpt:CHECKPOINT_DIR)\n")
        return 2
    if checkpoint:
        try:
            args.spec = checkpoint_spec(checkpoint)
        except (OSError, ValueError, KeyError) as exc:
            sys.stderr.write(f"shardline serve: cannot use checkpoint {checkpoint}: {exc}\n")
            return 2
    else:
        args.spec = minilm.spec() if name == "minilm" else gpt.spec()
    args.name = name
    if args.stages < 1:
        sys.stderr.write("shardline serve: --stages must be >= 1\n")
        return 2
    if args.max_body_bytes < 1 or args.header_timeout <= 0 or args.body_timeout <= 0:
        sys.stderr.write("shardline serve: --max-body-bytes must be >= 1, --header-timeout "
                         "and --body-timeout > 0\n")
        return 2
    try:
        sock = socket.create_server((args.host, args.port))
    except OSError as exc:
        sys.stderr.write(f"shardline serve: cannot listen on {args.host}:{args.port}: "
                         f"{exc.strerror}\n")
        return 2
    try:
        run(_serve(args, sock))
    except ShardlineError as exc:
        sys.stderr.write(f"shardline serve: {exc}\n")
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        sock.close()
    return 0


@contextlib.asynccontextmanager
async def _cluster(node: Node, workers: int) -> AsyncIterator[LocalCluster | None]:
    if workers == 0:
        yield None
        return
    async with LocalCluster(workers, node=node) as cluster:
        yield cluster


async def _serve(args: argparse.Namespace, sock: socket.socket) -> None:
    import uvicorn

    from ._app import create_app
    from ._http import GuardedProtocol

    workers = args.stages if args.workers is None else args.workers
    async with Node() as node, _cluster(node, workers) as cluster:
        placement = (["cpu"] * args.stages if cluster is None else
                     [cluster.nodes[i % len(cluster.nodes)] for i in range(args.stages)])
        pipe = await Pipeline.start(node, args.spec, placement=placement,
                                    microbatches=args.microbatches or args.stages)
        metrics = ServeMetrics()
        service: EmbeddingService | CompletionService
        if args.name == "minilm":
            service = EmbeddingService(args.name, pipe, metrics=metrics,
                                       max_batch=args.max_batch,
                                       max_wait_ms=args.max_wait_ms, max_queue=args.max_queue)
        else:
            service = CompletionService(args.name, pipe, metrics=metrics,
                                        context=int(args.spec.config["seq"]),
                                        max_queue=args.max_queue)
        try:
            async with service, anyio.create_task_group() as tg:
                app = create_app({args.name: service}, metrics, api_key=args.api_key,
                                 max_body_bytes=args.max_body_bytes,
                                 body_timeout=args.body_timeout)
                closed = metrics.connections_closed
                protocol = GuardedProtocol.configure(
                    header_timeout=args.header_timeout, drain_timeout=args.body_timeout,
                    on_close=lambda reason: closed.labels(reason).inc())
                config = uvicorn.Config(app, http=protocol, ws="none", lifespan="off",
                                        log_level=args.log_level, access_log=False)
                server = uvicorn.Server(config)
                # What the model and the libraries allocated stays for good: out of the
                # collector's way, so its full passes (which hold the GIL, and so the
                # event loop) walk only what requests allocate.
                gc.collect()
                gc.freeze()
                tg.start_soon(metrics.measure_loop_lag)
                host, port = sock.getsockname()[:2]
                sys.stdout.write(f"shardline serve http://{host}:{port} model={args.name} "
                                 f"stages={args.stages} workers={workers}\n")
                sys.stdout.flush()
                await server.serve(sockets=[sock])
                tg.cancel_scope.cancel()
        finally:
            with contextlib.suppress(ShardlineError):
                await pipe.stop()
