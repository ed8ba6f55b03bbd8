"""``shardline run script.py``: the one command every rank of a launched job runs.

Rank 0 runs the script in this process (``sl.Cluster.from_env()`` inside it forms the
cluster). Every other rank becomes a supervisor whose child is a worker node that
joins rank 0: the supervisor is the one process that learns at once when that child
dies, reports how to the driver (so asks to it fail with ``NodeLost`` naming the
cause), and restarts it if asked to. When the script ends, the driver tells its
workers to leave; ranks that never joined are told by a brief stand-in on the head
port, so every rank exits: rank 0 with the script's status, the others with 0.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import runpy
import signal
import sys
import traceback
from pathlib import Path

import anyio

from ._argtypes import at_least, module_name, positive_float
from ._errors import ShardlineError
from ._runtime import run
from ._worker import DRIVER_LOST, REFUSED
from .actors import Node
from .actors._formation import ranks_joined_here, resolves_to_loopback
from .actors._join import JOIN_NAME, JoinActor, Roster
from .actors._launchers import Launch, read_launch
from .actors._supervise import WorkerExit, WorkerProcess
from .transport import KeyPair

__all__ = ["add_arguments", "run_command"]

log = logging.getLogger("shardline.run")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow", action="append", default=[], metavar="MODULE",
                        type=module_name,
                        help="module (or package) the workers let the driver spawn actors "
                        "from; repeatable (default: none but shardline.models, which is "
                        "always allowed)")
    secure = parser.add_mutually_exclusive_group()
    secure.add_argument("--keys", metavar="DIR", help="one CURVE keypair every rank shares "
                        "(a Secret, a shared filesystem): each rank accepts exactly that key "
                        "(default: no CURVE; then the head must be on loopback, or give "
                        "--insecure)")
    secure.add_argument("--insecure", action="store_true",
                        help="no CURVE, on a trusted network (default: refuse a "
                        "non-loopback head without --keys)")
    parser.add_argument("--timeout", type=positive_float, default=120.0, metavar="SECONDS",
                        help="how long a worker rank waits to join rank 0 (default 120)")
    parser.add_argument("--restarts", type=at_least(0), default=0, metavar="N",
                        help="restart a worker rank's node up to N times after it dies; it "
                        "rejoins with its rank (default 0)")
    parser.add_argument("--peer-timeout", type=positive_float, default=5.0,
                        metavar="SECONDS",
                        help="seconds of silence before a peer is declared lost (default 5)")
    parser.add_argument("script", help="the Python script rank 0 runs; its directory and "
                        "the current one are on the workers' import path")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the script")


def run_command(args: argparse.Namespace) -> int:
    try:
        launch = read_launch()
        keys = str(Path(args.keys).resolve()) if args.keys else None
        pair = KeyPair.load(keys) if keys else None
    except (ValueError, OSError) as exc:
        sys.stderr.write(f"shardline run: {exc}\n")
        return 2
    log.info("shardline run: %s", launch)
    if launch.rank == 0:
        return _run_script(args, launch, keys)
    head = launch.head if pair is None else f"{launch.head};key={pair.public.decode()}"
    return run(_supervise(args, launch, keys, head))


# -- rank 0 ----------------------------------------------------------------------------------

def _run_script(args: argparse.Namespace, launch: Launch, keys: str | None) -> int:
    # What Cluster.from_env() reads inside the script.
    os.environ.pop("SHARDLINE_KEYS", None)
    os.environ.pop("SHARDLINE_INSECURE", None)
    if keys:
        os.environ["SHARDLINE_KEYS"] = keys
    if args.insecure:
        os.environ["SHARDLINE_INSECURE"] = "1"
    script = str(Path(args.script).resolve())
    sys.argv = [args.script, *args.args]
    sys.path.insert(0, str(Path(script).parent))
    try:
        if not Path(script).is_file():
            # Still tell the other ranks below, so that they exit too.
            sys.stderr.write(f"shardline run: no script at {args.script}\n")
            status = 2
        else:
            runpy.run_path(script, run_name="__main__")
            status = 0
    except SystemExit as exc:
        status = _exit_status(exc.code)
    except KeyboardInterrupt:
        status = 130
    except BaseException:
        traceback.print_exc()
        status = 1
    sys.stdout.flush()
    missing = set(range(1, launch.world_size)) - ranks_joined_here()
    if missing:
        with contextlib.suppress(Exception):
            run(_tell_latecomers(launch, keys, args.insecure, missing, status, args.timeout))
    return status


def _exit_status(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    sys.stderr.write(f"{code}\n")
    return 1


async def _tell_latecomers(launch: Launch, keys: str | None, insecure: bool,
                           missing: set[int], status: int, timeout: float) -> None:
    """Answer the ranks that never joined (the script ended first) so they exit."""
    bind = "127.0.0.1" if resolves_to_loopback(launch.head_host) else "0.0.0.0"
    node = Node(f"tcp://{bind}:{launch.head_port}", keys=keys, insecure=insecure,
                advertise=launch.head)
    why = f"the script on rank 0 ended (exit status {status}) before this rank joined"
    roster = Roster(node, launch.world_size - 1, ended=why)
    try:
        async with node:
            await node.spawn(JoinActor, roster, name=JOIN_NAME)
            with anyio.move_on_after(timeout):
                while not missing <= roster.told:
                    await roster.changed.wait()
    except (OSError, ShardlineError) as exc:
        log.warning("could not tell the other ranks that the script ended: %s", exc)


# -- every other rank --------------------------------------------------------------------------

def _worker_command(args: argparse.Namespace, launch: Launch, keys: str | None,
                    head: str) -> list[str]:
    cmd = [sys.executable, "-m", "shardline.cli", "node", "--join", head,
           "--rank", str(launch.rank), "--join-timeout", str(args.timeout),
           "--peer-timeout", str(args.peer_timeout), "--exit-with-parent"]
    for module in args.allow:
        cmd += ["--allow", module]
    if keys:
        cmd += ["--keys", keys]
    if args.insecure:
        cmd += ["--insecure"]
    if os.environ.get("SHARDLINE_ADVERTISE"):
        cmd += ["--advertise", os.environ["SHARDLINE_ADVERTISE"]]
    return cmd


def _worker_env(script: str) -> dict[str, str]:
    # The worker imports what the script can: modules beside it, and the current
    # directory (as ``python script.py`` and ``python -m`` would).
    env = dict(os.environ)
    paths = [str(Path(script).resolve().parent), os.getcwd()]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


async def _supervise(args: argparse.Namespace, launch: Launch, keys: str | None,
                     head: str) -> int:
    command = _worker_command(args, launch, keys, head)
    env = _worker_env(args.script)
    restarts = args.restarts
    stopping = False
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        while True:
            worker = await WorkerProcess.start(command, env=env, banner=False)
            async with anyio.create_task_group() as tg:
                async def forward(worker: WorkerProcess = worker) -> None:
                    nonlocal stopping
                    async for _ in signals:
                        stopping = True
                        worker.process.send_signal(signal.SIGTERM)

                tg.start_soon(forward)
                ended = await worker.wait()
                tg.cancel_scope.cancel()
            await worker.stop(0.0)
            if stopping or ended.returncode in (0, DRIVER_LOST, REFUSED):
                return ended.returncode if ended.returncode >= 0 else 128 - ended.returncode
            sys.stderr.write(f"shardline run: rank {launch.rank}'s worker (pid {ended.pid} "
                             f"on {ended.host}) {ended.cause}\n")
            reported = await _report(launch, keys, head, ended)
            if restarts <= 0 or not reported:   # no driver to rejoin: done
                return ended.returncode if ended.returncode > 0 else 128 - ended.returncode
            restarts -= 1
            sys.stderr.write(f"shardline run: restarting rank {launch.rank}'s worker "
                             f"({restarts} restarts left)\n")


async def _report(launch: Launch, keys: str | None, head: str, ended: WorkerExit) -> bool:
    """Tell the driver how this rank's worker ended, so its asks fail now, naming it.
    False if no driver answered."""
    try:
        with anyio.fail_after(5.0):
            async with Node(keys=keys) as node:
                join = await node.lookup(head, JOIN_NAME, timeout=3.0)
                await join.ask("lost", launch.rank, ended.pid, ended.cause, timeout=3.0)
        return True
    except (TimeoutError, OSError, ShardlineError) as exc:
        log.warning("could not tell the driver that rank %d's worker ended: %s",
                    launch.rank, exc)
        return False
