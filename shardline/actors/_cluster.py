"""``LocalCluster``: n worker node subprocesses on this host, reaped on exit."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterable
from types import TracebackType

import anyio
from anyio.abc import Process

from .._errors import NodeLost
from ._node import Node
from ._remote import RemoteNode

__all__ = ["LocalCluster"]


class LocalCluster:
    """Start ``n`` ``shardline node`` processes on 127.0.0.1 (ephemeral ports).

    ``async with LocalCluster(2, allow=["myapp.actors"]) as cluster`` connects a driver
    node (``cluster.node``, or the ``node`` you pass) to each worker
    (``cluster.nodes[i]``, a ``RemoteNode``). On exit, even when the body raised, every
    worker gets SIGTERM (stopping its actors gracefully), then SIGKILL after
    ``stop_timeout`` seconds, and is reaped. If the driver process itself dies, the
    workers notice within a second and stop on their own. Unless ``OMP_NUM_THREADS`` is
    set, each worker gets ``cpu_count // n`` intra-op threads.
    """

    def __init__(self, n: int = 2, *, allow: Iterable[str] = (), node: Node | None = None,
                 peer_timeout: float = 5.0, start_timeout: float = 60.0,
                 stop_timeout: float = 5.0, env: dict[str, str] | None = None,
                 node_args: Iterable[str] = ()) -> None:
        if n < 1:
            raise ValueError(f"a cluster needs n >= 1 workers, got {n}")
        self.n = n
        self.allow = list(allow)
        self.peer_timeout = peer_timeout
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._env = env
        self._node_args = list(node_args)  # extra ``shardline node`` flags
        self._own_node = node is None
        self.node = node if node is not None else Node(peer_timeout=peer_timeout)
        self.nodes: list[RemoteNode] = []
        self.processes: list[Process] = []
        self._addresses: dict[int, str] = {}

    def _command(self) -> list[str]:
        cmd = [sys.executable, "-m", "shardline.cli", "node", "--listen", "tcp://127.0.0.1:0",
               "--peer-timeout", str(self.peer_timeout), "--exit-with-parent"]
        for module in self.allow:
            cmd += ["--allow", module]
        return cmd + self._node_args

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        # Workers import the same modules the driver can (tests, examples, apps).
        paths = [p or os.getcwd() for p in sys.path]
        env["PYTHONPATH"] = os.pathsep.join(paths)
        # n workers on one host share its cores: without this each one starts a full
        # set of intra-op threads (torch, BLAS) and they fight over the CPU. Ray does the
        # same for its workers. An explicit setting, inherited or passed, wins.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // self.n)))
        env.update(self._env or {})
        return env

    async def __aenter__(self) -> LocalCluster:
        if self._own_node:
            await self.node.__aenter__()
        try:
            with anyio.fail_after(self.start_timeout):
                async with anyio.create_task_group() as tg:
                    for _ in range(self.n):
                        tg.start_soon(self._start_one)
            # Keep the order the workers were started in (index = rank).
            for proc in self.processes:
                address = self._addresses[proc.pid]
                self.nodes.append(await self.node.connect(address))
        except BaseException:
            await self._shutdown()
            raise
        return self

    async def _start_one(self) -> None:
        proc = await anyio.open_process(self._command(), stdout=subprocess.PIPE,
                                        stderr=None, env=self._child_env())
        self.processes.append(proc)
        assert proc.stdout is not None
        line = b""
        while not line.endswith(b"\n"):
            chunk = await proc.stdout.receive(1)  # the banner is one short line
            line += chunk
        text = line.decode().strip()
        if not text.startswith("shardline node "):
            raise NodeLost(f"worker {proc.pid} did not start: {text!r}")
        self._addresses[proc.pid] = text.split()[2]

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self._shutdown()

    async def _shutdown(self) -> None:
        # The node's own exit shields what must finish; it has to run in this scope
        # (it closes the task group it opened here), so it is not wrapped in another.
        try:
            if self._own_node:
                await self.node.__aexit__(None, None, None)
        finally:
            with anyio.CancelScope(shield=True):
                for proc in self.processes:
                    await _reap(proc, self.stop_timeout)

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def __repr__(self) -> str:
        return f"<LocalCluster {len(self.nodes)}/{self.n} nodes>"


async def _reap(proc: Process, grace: float) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        with anyio.move_on_after(grace):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if proc.stdout is not None:
        await proc.stdout.aclose()
    await proc.aclose()

