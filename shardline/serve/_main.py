"""``shardline serve``: a LocalCluster, a pipeline, a batcher and the HTTP API in one
process, until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import contextlib
import gc
import socket
import sys
from collections.abc import AsyncIterator
from typing import Any

import anyio

from .. import LocalCluster, Node, run
from .._errors import ShardlineError
from ..models import Pipeline
from ._cli import one_line
from ._metrics import ServeMetrics
from ._models import ModelError, Served, resolve
from ._service import CompletionService, EmbeddingService

__all__ = ["serve_command"]


def serve_command(args: argparse.Namespace) -> int:
    """Checks every value before anything starts: a bad one is one line on stderr and
    exit code 2."""
    def refuse(message: str) -> int:
        sys.stderr.write(one_line(message))
        return 2

    try:
        served = resolve(args.model, name=args.name, quantized=args.quantize)
    except ModelError as exc:
        return refuse(str(exc))
    if args.stages > served.spec.n_layers:
        return refuse(f"--stages {args.stages}: the model has {served.spec.n_layers} "
                      f"layers, so at most {served.spec.n_layers} stages")
    devices = args.stages * args.replicas
    workers = devices if args.workers is None else args.workers
    if workers == 0 and args.replicas > 1:
        return refuse(f"--replicas {args.replicas} needs worker processes (with --workers "
                      "0 every copy is in the server process, and goes with it)")
    if workers > devices:
        copies = f" x {args.replicas} replicas" if args.replicas > 1 else ""
        return refuse(f"--workers {workers}: {args.stages} stages{copies} need {devices} "
                      f"workers; {workers - devices} would hold nothing")
    if workers and any(len(set(stage)) < args.replicas
                       for stage in zip(*_layout(args.stages, args.replicas, workers),
                                        strict=True)):
        return refuse(f"--workers {workers}: the {args.replicas} copies of a stage must be "
                      f"on different workers; give --workers {devices}")
    if served.warning is not None:
        sys.stderr.write(f"shardline serve: warning: {served.warning}\n")
    args.served, args.n_workers = served, workers
    try:
        sock = socket.create_server((args.host, args.port))
    except (OSError, OverflowError) as exc:
        return refuse(f"cannot listen on {args.host}:{args.port}: "
                      f"{getattr(exc, 'strerror', None) or exc}")
    try:
        run(_serve(args, sock))
    except (ShardlineError, ValueError, OSError) as exc:
        sys.stderr.write(f"shardline serve: {exc}\n")
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        sock.close()
    return 0


def _layout(stages: int, replicas: int, workers: int) -> list[list[int]]:
    """Which worker holds each stage of each replica: in turn, so copies of a stage are
    on different workers when there are enough."""
    return [[(r * stages + s) % workers for s in range(stages)] for r in range(replicas)]


@contextlib.asynccontextmanager
async def _cluster(node: Node, workers: int) -> AsyncIterator[LocalCluster | None]:
    if workers == 0:
        yield None
        return
    # Supervised: a worker that dies is started again, and the pipeline rebuilds the
    # stages it held there (Pipeline.start(..., spares=cluster)).
    async with LocalCluster(workers, node=node, restart=True) as cluster:
        yield cluster


async def _serve(args: argparse.Namespace, sock: socket.socket) -> None:
    import uvicorn

    from ._app import create_app
    from ._http import GuardedProtocol

    served: Served = args.served
    async with Node() as node, _cluster(node, args.n_workers) as cluster:
        if cluster is None:
            rows: list[list[Any]] = [["cpu"] * args.stages]
        else:
            rows = [[cluster.nodes[w] for w in row]
                    for row in _layout(args.stages, args.replicas, args.n_workers)]
        pipe = await Pipeline.start(node, served.spec, replicas=args.replicas,
                                    placement=rows if args.replicas > 1 else rows[0],
                                    spares=cluster if cluster is not None else (),
                                    microbatches=args.microbatches or args.stages)
        metrics = ServeMetrics()
        service: EmbeddingService | CompletionService
        if served.kind == "embeddings":
            service = EmbeddingService(served.name, pipe, metrics=metrics,
                                       max_batch=args.max_batch,
                                       max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                                       cluster=cluster)
        else:
            assert served.tokens is not None
            service = CompletionService(served.name, pipe, metrics=metrics,
                                        tokens=served.tokens, max_queue=args.max_queue,
                                        cluster=cluster)
        try:
            async with service, anyio.create_task_group() as tg:
                app = create_app({served.name: service}, metrics, api_key=args.api_key,
                                 max_body_bytes=args.max_body_bytes,
                                 body_timeout=args.body_timeout)
                closed = metrics.connections_closed
                protocol = GuardedProtocol.configure(
                    header_timeout=args.header_timeout, drain_timeout=args.body_timeout,
                    on_close=lambda reason: closed.labels(reason).inc())
                config = uvicorn.Config(app, http=protocol, ws="none", lifespan="off",
                                        log_level=args.log_level.lower(),
                                        access_log=False)
                server = uvicorn.Server(config)
                # What the model and the libraries allocated stays for good: out of the
                # collector's way, so its full passes (which hold the GIL, and so the
                # event loop) walk only what requests allocate.
                gc.collect()
                gc.freeze()
                tg.start_soon(metrics.measure_loop_lag)
                host, port = sock.getsockname()[:2]
                copies = f" replicas={args.replicas}" if args.replicas > 1 else ""
                sys.stdout.write(f"shardline serve http://{host}:{port} model={served.name} "
                                 f"stages={args.stages}{copies} workers={args.n_workers}\n")
                sys.stdout.flush()
                await server.serve(sockets=[sock])
                tg.cancel_scope.cancel()
        finally:
            with contextlib.suppress(ShardlineError):
                await pipe.stop()
