"""``LocalCluster``: n worker node subprocesses on this host, watched, reaped on exit,
and restarted on request."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable
from types import TracebackType

import anyio
from anyio.abc import Process, TaskGroup

from .._errors import ClusterTimeout, NodeLost
from ._node import Node
from ._remote import RemoteNode
from ._supervise import WorkerExit, WorkerProcess

__all__ = ["LocalCluster"]

log = logging.getLogger("shardline.actors")


class _Slot:
    """Worker ``index``: its current process and node, and every node it has been."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.worker: WorkerProcess | None = None
        self.node: RemoteNode | None = None
        self.history: list[RemoteNode] = []
        self.changed = anyio.Event()   # set (and replaced) when ``node`` changes
        self.failure: BaseException | None = None  # a restart that did not come up

    def notify(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()


class LocalCluster:
    """Start ``n`` ``shardline node`` processes on 127.0.0.1 (ephemeral ports).

    ``async with LocalCluster(2, allow=["myapp.actors"]) as cluster`` connects a driver
    node (``cluster.node``, or the ``node`` you pass) to each worker
    (``cluster.nodes[i]``, a ``RemoteNode``). On exit, even when the body raised, every
    worker gets SIGTERM (stopping its actors gracefully), then SIGKILL after
    ``stop_timeout`` seconds, and is reaped. If the driver process itself dies, the
    workers notice within a second and stop on their own. Unless ``OMP_NUM_THREADS`` is
    set, each worker gets ``cpu_count // n`` intra-op threads.

    The cluster is each worker's parent, so it knows at once when one ends: pending and
    new asks to it fail with ``NodeLost`` naming the worker, its pid and host and how it
    ended ("killed by SIGKILL", "exited with code 3", "killed by the kernel's OOM
    killer"); ``cluster.lost`` records each such end. With ``restart=True`` a worker
    that ends is started again (a new process and node, same index, same local rank):
    ``cluster.nodes[i]`` becomes the new ``RemoteNode``, and
    ``await cluster.replacement(old_node)`` returns it.
    """

    def __init__(self, n: int = 2, *, allow: Iterable[str] = (), node: Node | None = None,
                 peer_timeout: float = 5.0, start_timeout: float = 60.0,
                 stop_timeout: float = 5.0, env: dict[str, str] | None = None,
                 node_args: Iterable[str] = (), restart: bool = False) -> None:
        if n < 1:
            raise ValueError(f"a cluster needs n >= 1 workers, got {n}")
        self.n = n
        self.allow = list(allow)
        self.peer_timeout = peer_timeout
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.restart = restart
        self._env = env
        self._node_args = list(node_args)  # extra ``shardline node`` flags
        self._own_node = node is None
        self.node = node if node is not None else Node(peer_timeout=peer_timeout)
        self.lost: list[tuple[RemoteNode, WorkerExit]] = []
        """Every worker that ended while the cluster ran: its node and how it ended."""
        self._slots = [_Slot(i) for i in range(n)]
        self._retired: list[WorkerProcess] = []  # ended workers, reaped on exit
        self._tg: TaskGroup | None = None
        self._closing = False

    @property
    def nodes(self) -> list[RemoteNode]:
        """The current node of each worker, by index."""
        return [slot.node for slot in self._slots if slot.node is not None]

    @property
    def processes(self) -> list[Process]:
        """The current process of each worker, by index."""
        return [slot.worker.process for slot in self._slots if slot.worker is not None]

    def pids(self) -> list[int]:
        """The process id of each worker's current process, by index."""
        return [slot.worker.pid for slot in self._slots if slot.worker is not None]

    def _command(self) -> list[str]:
        cmd = [sys.executable, "-m", "shardline.cli", "node", "--listen", "tcp://127.0.0.1:0",
               "--peer-timeout", str(self.peer_timeout), "--exit-with-parent"]
        for module in self.allow:
            cmd += ["--allow", module]
        return cmd + self._node_args

    def _child_env(self, index: int) -> dict[str, str]:
        env = dict(os.environ)
        # Workers import the same modules the driver can (tests, examples, apps).
        paths = [p or os.getcwd() for p in sys.path]
        env["PYTHONPATH"] = os.pathsep.join(paths)
        # n workers on one host share its cores: without this each one starts a full
        # set of intra-op threads (torch, BLAS) and they fight over the CPU. Ray does the
        # same for its workers. An explicit setting, inherited or passed, wins.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // self.n)))
        # Worker i is local rank i: on a host with GPUs it takes cuda:{i mod count}.
        env["SHARDLINE_LOCAL_RANK"] = str(index)
        env.update(self._env or {})
        return env

    async def __aenter__(self) -> LocalCluster:
        if self._own_node:
            await self.node.__aenter__()
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        try:
            with anyio.fail_after(self.start_timeout):
                async with anyio.create_task_group() as starting:
                    for slot in self._slots:
                        starting.start_soon(self._start, slot)
        except BaseException:
            await self._shutdown()
            raise
        return self

    async def _start(self, slot: _Slot) -> None:
        worker = await WorkerProcess.start(self._command(), env=self._child_env(slot.index))
        slot.worker = worker
        assert worker.address is not None
        node = await self.node.connect(worker.address)
        slot.node = node
        slot.history.append(node)
        slot.failure = None
        assert self._tg is not None
        self._tg.start_soon(self._watch, slot, worker, node)

    async def _watch(self, slot: _Slot, worker: WorkerProcess, node: RemoteNode) -> None:
        try:
            ended = await worker.wait()
            if self._closing:
                return
            message = (f"worker {slot.index} (pid {ended.pid} on {ended.host}, "
                       f"{worker.address}) {ended.cause}")
            node._ended = message
            self.node._declare_lost(node.address, NodeLost(message))
            self.lost.append((node, ended))
            self._retired.append(worker)
            log.warning("%s", message)
            if self.restart:
                try:
                    with anyio.fail_after(self.start_timeout):
                        await self._start(slot)
                    log.warning("worker %d restarted: pid %s at %s", slot.index,
                                slot.worker.pid if slot.worker else None,
                                slot.node.address if slot.node else None)
                except Exception as exc:
                    slot.failure = exc
                    log.error("restarting worker %d failed: %s", slot.index, exc)
        except Exception:
            log.exception("watching worker %d failed", slot.index)
        finally:
            slot.notify()

    async def replacement(self, old: RemoteNode, *, timeout: float = 60.0) -> RemoteNode:
        """The node that replaces ``old``, one of this cluster's workers (current or
        earlier), once it is up. Needs ``restart=True``.

        Returns at once if the worker was already restarted. If ``old``'s process is
        still running (the caller found it unresponsive), it is killed first: the caller
        has given up on it. ``ClusterTimeout`` if no replacement is up within
        ``timeout`` seconds; ``NodeLost`` if starting it failed.
        """
        if not self.restart:
            raise RuntimeError("replacement() needs LocalCluster(..., restart=True)")
        slot = next((s for s in self._slots if any(n is old for n in s.history)), None)
        if slot is None:
            raise ValueError(f"{old!r} is not a worker of this cluster")
        try:
            with anyio.fail_after(timeout):
                while slot.node is old:
                    if slot.failure is not None:
                        raise NodeLost(f"restarting worker {slot.index} failed: "
                                       f"{slot.failure}") from slot.failure
                    changed = slot.changed
                    worker = slot.worker
                    if worker is not None and worker.pid == old.pid and (
                            worker.returncode is None):
                        worker.kill()   # old's own process, not a replacement starting
                    await changed.wait()
        except TimeoutError:
            raise ClusterTimeout(f"worker {slot.index} was not replaced within "
                                 f"{timeout} s") from None
        assert slot.node is not None
        return slot.node

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self._shutdown()

    async def _shutdown(self) -> None:
        self._closing = True
        tg, self._tg = self._tg, None
        try:
            if tg is not None:
                tg.cancel_scope.cancel()  # the watchers
                await tg.__aexit__(None, None, None)
        finally:
            # The node's own exit shields what must finish; it has to run in this scope
            # (it closes the task group it opened here), so it is not wrapped in another.
            try:
                if self._own_node:
                    await self.node.__aexit__(None, None, None)
            finally:
                with anyio.CancelScope(shield=True):
                    workers = [s.worker for s in self._slots if s.worker is not None]
                    for worker in [*workers, *self._retired]:
                        await worker.stop(self.stop_timeout)

    def __repr__(self) -> str:
        return f"<LocalCluster {len(self.nodes)}/{self.n} nodes>"
