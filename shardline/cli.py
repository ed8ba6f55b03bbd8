"""The ``shardline`` command: ``demo`` shows the system at work, ``node`` runs a worker
node, ``run`` runs a script on every rank of a launched job, ``serve`` serves a model
over HTTP, ``keys`` manages CURVE keys."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence

from ._version import __version__

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shardline",
        description="Asyncio actors over ZeroMQ + msgpack for sharded models.",
    )
    parser.add_argument("--version", action="version", version=f"shardline {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    node = sub.add_parser("node", help="run a worker node until SIGINT/SIGTERM")
    node.add_argument("--listen", default=None,
                      help="address to bind (default $SHARDLINE_LISTEN, else "
                      "tcp://127.0.0.1:0: a free port; with --join to a driver on "
                      "another host, tcp://0.0.0.0:0)")
    node.add_argument("--allow", action="append", default=[], metavar="MODULE",
                      help="module (or package) peers may spawn actors from; repeatable")
    node.add_argument("--advertise", help="address other nodes use to reach this one "
                      "(default: the listen address; for 0.0.0.0 the host's primary IP)")
    node.add_argument("--keys", metavar="DIR", help="CURVE keypair directory: require CURVE")
    node.add_argument("--allow-keys", action="append", default=[], metavar="FILE",
                      help="client public keys to accept (key file, directory of .key files, "
                      "or a text file with one Z85 key per line); repeatable")
    node.add_argument("--insecure", action="store_true",
                      help="allow a non-loopback address without CURVE keys")
    node.add_argument("--peer-timeout", type=float, default=5.0,
                      help="seconds of silence before a peer is declared lost (default 5)")
    node.add_argument("--max-frame-size", type=int, default=1 << 30, metavar="BYTES",
                      help="largest frame accepted; a peer sending more is disconnected")
    node.add_argument("--max-header-size", type=int, default=16 << 20, metavar="BYTES")
    node.add_argument("--max-frames", type=int, default=1024, metavar="N",
                      help="most buffer frames in one message")
    node.add_argument("--exit-with-parent", action="store_true",
                      help="stop when the process that started this node dies "
                      "(LocalCluster sets it, so a killed driver leaves no workers behind)")
    node.add_argument("--join", metavar="ADDR",
                      help="join the cluster whose driver listens at ADDR (sl.Cluster); "
                      "exit when it ends")
    node.add_argument("--server-key", metavar="KEY",
                      help="the driver's CURVE public key (Z85 or a .key file), if ADDR "
                      "does not carry it as ';key=...'; the driver may then connect back")
    node.add_argument("--rank", type=int, default=None,
                      help="with --join: ask for this rank (1..N; default: the lowest free)")
    node.add_argument("--join-timeout", type=float, default=120.0, metavar="SECONDS",
                      help="how long to wait for the driver (default 120)")
    node.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                      help="serve Prometheus metrics of this node's actors and peers on "
                      "http://127.0.0.1:PORT/metrics (0: a free port, printed on the first "
                      "line); needs prometheus_client")
    node.add_argument("--log-level", default=os.environ.get("SHARDLINE_LOG", "WARNING"))

    run = sub.add_parser("run", help="run a script on every rank of a job (torchrun, srun, "
                         "mpirun, a StatefulSet): rank 0 runs it, the others join as workers")
    from ._run_command import add_arguments as run_arguments

    run_arguments(run)

    demo = sub.add_parser("demo", help="train a small GPT across worker processes, then "
                          "sample from it: the whole system in about a minute")
    from .demo import add_arguments as demo_arguments

    demo_arguments(demo)

    serve = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API "
                           "(needs: pip install 'shardline[serve]')")
    from .serve._cli import add_arguments

    add_arguments(serve)

    keys = sub.add_parser("keys", help="CURVE keys")
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    gen = keys_sub.add_parser("generate", help="write DIR/node.key and DIR/node.key_secret")
    gen.add_argument("dir")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "node":
        from ._worker import run_node

        logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")
        return run_node(args)
    if args.command == "run":
        from ._run_command import run_command

        logging.basicConfig(level=os.environ.get("SHARDLINE_LOG", "WARNING").upper(),
                            stream=sys.stderr,
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")
        return run_command(args)
    if args.command == "demo":
        from .demo import demo_command

        logging.basicConfig(level="WARNING", stream=sys.stderr,
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")
        return demo_command(args)
    if args.command == "serve":
        from .serve._main import serve_command

        logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")
        return serve_command(args)
    if args.command == "keys":
        from .transport import KeyPair

        pair = KeyPair.write(args.dir)
        sys.stdout.write(f"wrote {args.dir}/node.key (public: {pair.public.decode()}) "
                         f"and {args.dir}/node.key_secret\n")
        return 0
    parser.print_help(sys.stdout)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
