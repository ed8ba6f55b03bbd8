"""Worker processes seen from their parent: started, watched, told apart by how they
ended ("killed by SIGKILL", "exited with code 3", "killed by the kernel's OOM killer").

Used by ``LocalCluster`` and by ``shardline run``'s per-rank supervisor: the parent is
the one process that learns of a death at once (its ``wait`` returns), where a peer
only notices silence.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.to_thread
from anyio.abc import Process

from .._errors import NodeLost

__all__ = ["OomWitness", "WorkerExit", "WorkerProcess", "exit_cause"]

log = logging.getLogger("shardline.actors")

# Most kernel log records read when looking for an OOM kill (the ring holds far fewer).
_KMSG_RECORDS = 200_000


@dataclass(frozen=True)
class WorkerExit:
    """How one worker process ended."""

    pid: int
    host: str
    returncode: int
    cause: str
    """``"exited with code 3"``, ``"killed by SIGKILL"``, ``"killed by the kernel's OOM
    killer (...)"``."""


def exit_cause(returncode: int, oom: str | None = None) -> str:
    """Words for a return code as ``subprocess`` reports it (negative: the signal).
    ``oom`` is the evidence of an OOM kill, if any was found."""
    if returncode >= 0:
        return f"exited with code {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    if oom is not None and -returncode == signal.SIGKILL:
        return f"killed by the kernel's OOM killer (SIGKILL; {oom})"
    return f"killed by {name}"


class OomWitness:
    """What the kernel tells about an OOM kill of one process, read two ways:

    - the ``oom_kill`` counter of the memory cgroup the process ran in (cgroup v2
      ``memory.events``, v1 ``memory.oom_control``), sampled at start and at death;
    - the kernel log (``/dev/kmsg``; needs root or ``kernel.dmesg_restrict=0``), whose
      OOM report names the killed pid.

    The log is exact; the counter says only that something in the cgroup was killed,
    which, for a process that died of SIGKILL, is taken as that process.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._counters = {path: _oom_count(path) for path in _oom_counter_files(pid)}

    def verdict(self, *, read_kernel_log: bool = True) -> str | None:
        """The evidence of an OOM kill, in words, or ``None`` if none was found."""
        if read_kernel_log and _kernel_log_names_oom_kill(self.pid):
            return "the kernel log names it"
        for path, before in self._counters.items():
            after = _oom_count(path)
            if before is not None and after is not None and after > before:
                return f"oom_kill in {path} rose from {before} to {after}"
        return None


def _oom_counter_files(pid: int) -> list[Path]:
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        path = path.lstrip("/")
        if controllers == "":          # cgroup v2 (or the unified half of a hybrid)
            candidates = [Path("/sys/fs/cgroup", path, "memory.events"),
                          Path("/sys/fs/cgroup/unified", path, "memory.events")]
        elif "memory" in controllers.split(","):
            candidates = [Path("/sys/fs/cgroup/memory", path, "memory.oom_control")]
        else:
            continue
        found += [c for c in candidates if c.is_file()]
    return found


def _oom_count(path: Path) -> int | None:
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
    except (OSError, ValueError):
        pass
    return None


def _kernel_log_names_oom_kill(pid: int) -> bool:
    pattern = re.compile(rf"(Killed process {pid} \(|[,:]pid={pid},)".encode())
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        for _ in range(_KMSG_RECORDS):
            try:
                record = os.read(fd, 8192)  # one record per read
            except BlockingIOError:
                return False                # the end of the log
            except OSError as exc:
                if exc.errno == errno.EPIPE:
                    continue                # overwritten while we read: skip it
                return False
            if not record:
                return False
            if pattern.search(record):
                return True
        return False
    finally:
        os.close(fd)


class WorkerProcess:
    """One worker subprocess and its parent's view of it.

    ``start`` runs ``command``; with ``banner=True`` it reads the first stdout line
    (``shardline node ADDRESS id=NODE_ID``) and forwards the rest of stdout to this
    process's stdout. ``wait`` returns a ``WorkerExit`` naming how it ended.
    """

    def __init__(self, process: Process, *, address: str | None = None,
                 node_id: str | None = None) -> None:
        self.process = process
        self.pid = process.pid
        self.host = socket.gethostname()
        self.address = address
        self.node_id = node_id
        self._witness = OomWitness(process.pid)
        self._exit: WorkerExit | None = None

    @classmethod
    async def start(cls, command: Sequence[str], *, env: Mapping[str, str] | None = None,
                    banner: bool = True) -> WorkerProcess:
        process = await anyio.open_process(list(command),
                                           stdout=subprocess.PIPE if banner else None,
                                           stderr=None, env=dict(env) if env else None)
        worker = cls(process)
        if not banner:
            return worker
        try:
            assert process.stdout is not None
            line = b""
            with contextlib.suppress(anyio.EndOfStream):
                while not line.endswith(b"\n"):
                    line += await process.stdout.receive(1)  # the banner is one short line
            text = line.decode(errors="replace").strip()
            if not text.startswith("shardline node "):
                code = await process.wait()
                raise NodeLost(f"worker pid {process.pid} did not start ({exit_cause(code)})"
                               f"{': ' + repr(text) if text else ''}")
            parts = text.split()
            worker.address = parts[2]
            worker.node_id = next((p[3:] for p in parts if p.startswith("id=")), None)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await worker.stop(0.0)
            raise
        return worker

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    async def wait(self) -> WorkerExit:
        """Wait until the process ends; say how (its stdout is forwarded meanwhile)."""
        if self._exit is None:
            async with anyio.create_task_group() as tg:
                drained = anyio.Event()
                if self.process.stdout is not None:
                    tg.start_soon(self._forward_stdout, drained)
                else:
                    drained.set()
                code = await self.process.wait()
                # The last output is still in the pipe; a grandchild holding it open
                # must not keep us here.
                with anyio.move_on_after(1.0):
                    await drained.wait()
                tg.cancel_scope.cancel()
            oom = None
            if code == -signal.SIGKILL:
                oom = await anyio.to_thread.run_sync(self._witness.verdict)
            self._exit = WorkerExit(self.pid, self.host, code, exit_cause(code, oom))
        return self._exit

    async def _forward_stdout(self, drained: anyio.Event) -> None:
        stream = self.process.stdout
        assert stream is not None
        out = getattr(sys.stdout, "buffer", None)
        try:
            async for chunk in stream:
                if out is not None:
                    with contextlib.suppress(OSError, ValueError):
                        out.write(chunk)
                        out.flush()
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass
        finally:
            drained.set()

    def kill(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()

    async def stop(self, grace: float) -> None:
        """SIGTERM (the node stops its actors gracefully), SIGKILL after ``grace``
        seconds, then reap. Safe to call more than once."""
        proc = self.process
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            with anyio.move_on_after(grace):
                await proc.wait()
            if proc.returncode is None:
                self.kill()
                await proc.wait()
        if proc.stdout is not None:
            await proc.stdout.aclose()
        await proc.aclose()

    def __repr__(self) -> str:
        state = "running" if self.returncode is None else f"ended ({self.returncode})"
        return f"<WorkerProcess pid={self.pid} {self.address or ''} {state}>"
