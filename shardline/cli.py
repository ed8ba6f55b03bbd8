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

from ._argtypes import Parser, at_least, log_level, module_name, port, positive_float
from ._version import __version__

__all__ = ["add_node_arguments", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="shardline",
        description="Asyncio actors over ZeroMQ + msgpack for sharded models.",
    )
    parser.add_argument("--version", action="version", version=f"shardline {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    node = sub.add_parser("node", help="run a worker node until SIGINT/SIGTERM",
                          description="Run a worker node in the foreground until SIGINT or "
                          "SIGTERM (it then stops its actors gracefully), or with --join "
                          "until the cluster it joined ends. The first line on stdout is "
                          "'shardline node ADDRESS id=NODE_ID'. The current directory is "
                          "on the node's import path, so --allow myapp.actors finds "
                          "./myapp/actors.py.")
    add_node_arguments(node)

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
    gen = keys_sub.add_parser("generate", help="write DIR/node.key and DIR/node.key_secret",
                              description="Write a CURVE keypair: DIR/node.key (the public "
                              "key, to hand to the nodes that should accept this one) and "
                              "DIR/node.key_secret (readable by you only). DIR is created "
                              "if needed.")
    gen.add_argument("dir", metavar="DIR", help="directory for the keypair")
    gen.add_argument("--force", action="store_true",
                     help="replace a keypair DIR already holds (default: refuse, since "
                     "every allow-list holding the old public key would stop accepting it)")
    return parser


def add_node_arguments(node: argparse.ArgumentParser) -> None:
    node.add_argument("--listen", default=None, metavar="ADDR",
                      help="address to bind (default $SHARDLINE_LISTEN, else "
                      "tcp://127.0.0.1:0: a free port; with --join to a driver on "
                      "another host, tcp://0.0.0.0:0)")
    node.add_argument("--allow", action="append", default=[], metavar="MODULE",
                      type=module_name,
                      help="module (or package) peers may spawn actors from, as in "
                      "myapp.actors; repeatable (default: none but shardline.models, "
                      "which is always allowed)")
    node.add_argument("--advertise", metavar="ADDR",
                      help="address other nodes use to reach this one (default: the listen "
                      "address; for 0.0.0.0 the host's primary IP)")
    node.add_argument("--keys", metavar="DIR",
                      help="CURVE keypair directory (from 'shardline keys generate'): "
                      "require CURVE and accept only this keypair and --allow-keys "
                      "(default: no CURVE, loopback only unless --insecure)")
    node.add_argument("--allow-keys", action="append", default=[], metavar="FILE",
                      help="client public keys to accept, with --keys (key file, directory "
                      "of .key files, or a text file with one Z85 key per line); "
                      "repeatable (default: only this node's own key)")
    node.add_argument("--insecure", action="store_true",
                      help="allow a non-loopback address without CURVE keys (default: "
                      "refuse)")
    node.add_argument("--peer-timeout", type=positive_float, default=5.0, metavar="SECONDS",
                      help="seconds of silence before a peer is declared lost (default 5)")
    node.add_argument("--max-frame-size", type=at_least(1), default=1 << 30,
                      metavar="BYTES", help="largest frame accepted; a peer sending more is "
                      "disconnected (default 1 GiB)")
    node.add_argument("--max-header-size", type=at_least(1), default=16 << 20,
                      metavar="BYTES", help="largest message header (msgpack) accepted; a "
                      "larger one is answered with ProtocolError (default 16 MiB)")
    node.add_argument("--max-frames", type=at_least(1), default=1024, metavar="N",
                      help="most buffer frames in one message (default 1024)")
    node.add_argument("--exit-with-parent", action="store_true",
                      help="stop when the process that started this node dies "
                      "(LocalCluster sets it, so a killed driver leaves no workers behind; "
                      "default: run on)")
    node.add_argument("--join", metavar="ADDR",
                      help="join the cluster whose driver listens at ADDR (sl.Cluster); "
                      "exit when it ends (default: serve until SIGINT/SIGTERM)")
    node.add_argument("--server-key", metavar="KEY",
                      help="with --join: the driver's CURVE public key (Z85 or a .key "
                      "file), if ADDR does not carry it as ';key=...'; the driver may "
                      "then connect back (default: the key in ADDR, else no CURVE)")
    node.add_argument("--rank", type=at_least(1), default=None,
                      help="with --join: ask for this rank (1..N; default: the lowest free)")
    node.add_argument("--join-timeout", type=positive_float, default=120.0,
                      metavar="SECONDS",
                      help="with --join: how long to wait for the driver (default 120)")
    node.add_argument("--metrics-port", type=port, default=None, metavar="PORT",
                      help="serve Prometheus metrics of this node's actors and peers on "
                      "http://127.0.0.1:PORT/metrics (0: a free port, printed on the first "
                      "line); needs prometheus_client (default: no metrics)")
    node.add_argument("--log-level", type=log_level, default=None,
                      metavar="LEVEL", help="debug, info, warning, error or critical: "
                      "what goes to stderr (default $SHARDLINE_LOG, else warning)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "node":
        from ._worker import run_node

        level = args.log_level or _env_log_level("node")
        if level is None:
            return 2
        _log_to_stderr(level)
        return run_node(args)
    if args.command == "run":
        from ._run_command import run_command

        level = _env_log_level("run")
        if level is None:
            return 2
        _log_to_stderr(level)
        return run_command(args)
    if args.command == "demo":
        from .demo import demo_command

        _log_to_stderr("WARNING")
        return demo_command(args)
    if args.command == "serve":
        from .serve._main import serve_command

        _log_to_stderr(args.log_level)  # checked by its type, like every serve flag
        return serve_command(args)
    if args.command == "keys":
        return _generate_keys(args.dir, args.force)
    parser.print_help(sys.stdout)
    return 0


def _env_log_level(command: str) -> str | None:
    try:
        return log_level(os.environ.get("SHARDLINE_LOG", "WARNING"))
    except argparse.ArgumentTypeError as exc:
        _usage_error(command, f"$SHARDLINE_LOG: {exc}")
        return None


def _log_to_stderr(level: str) -> None:
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


def _usage_error(command: str, message: str) -> int:
    sys.stderr.write(f"shardline {command}: {message} (see 'shardline {command} --help')\n")
    return 2


def _generate_keys(directory: str, force: bool) -> int:
    from .transport import KeyPair

    try:
        pair = KeyPair.write(directory, overwrite=force)
    except FileExistsError as exc:
        sys.stderr.write(f"shardline keys generate: {exc}; --force replaces it (every "
                         "allow-list holding the old public key then refuses this one)\n")
        return 2
    except OSError as exc:
        reason = exc.strerror or str(exc)
        sys.stderr.write(f"shardline keys generate: cannot write a keypair in {directory}: "
                         f"{reason}\n")
        return 2
    sys.stdout.write(f"wrote {directory}/node.key (public: {pair.public.decode()}) "
                     f"and {directory}/node.key_secret\n")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
