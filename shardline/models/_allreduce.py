"""Averaging a stage's gradients over its replicas (data parallel x pipeline parallel).

Each device of a replicated pipeline joins a process group with the same device of every
other replica: gloo on CPU, NCCL on CUDA, built from a ``TCPStore`` the driver hosts,
without a global ``init_process_group``, so several stages can share one process. The
choice, measured (``bench/data_parallel.py``): a ring over shardline's own ZeroMQ links
moved 64 MiB between two processes in about twice gloo's time on this machine, and
could not use NCCL's GPU-to-GPU paths at all.

As in DDP, gradients are reduced in buckets (parameters in reverse order, about the
order backward produces them), and a bucket starts reducing as soon as the last
gradient in it is final: in the last backward of its stage in the step, which the
device's program knows. The reduction then overlaps whatever backward work remains.
The result is the sum divided by the number of replicas; every replica receives the same
bits (a ring all-reduce computes each element's sum once and copies it), so replicas
stay bitwise identical.
"""

from __future__ import annotations

import contextlib
import datetime
import time
from typing import Any

import torch
import torch.distributed
from torch import nn

__all__ = ["GradSync", "join_group", "master_store"]

BUCKET_BYTES = 25 << 20  # DDP's default

# c10d's stores and backends are partly untyped; used as Any at this one boundary.
dist: Any = torch.distributed


def master_store(host: str, timeout: float) -> Any:
    """The rendezvous store the driver hosts for its pipelines' groups (any free port,
    ``.port``)."""
    return dist.TCPStore(host, 0, None, True, datetime.timedelta(seconds=timeout),
                         wait_for_workers=False)


def join_group(host: str, port: int, prefix: str, rank: int, size: int, device: str,
               bind_host: str, timeout: float) -> Any:
    """Blocks until all ``size`` members joined (call it off the event loop)."""
    delta = datetime.timedelta(seconds=timeout)
    store = dist.PrefixStore(prefix, dist.TCPStore(host, port, None, False, delta))
    if device.startswith("cuda"):
        return dist.ProcessGroupNCCL(store, rank, size)
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = delta
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=bind_host)]
    return dist.ProcessGroupGloo(store, rank, size, opts)


class _Bucket:
    __slots__ = ("flat", "params", "remaining", "stage", "started", "work")

    def __init__(self, stage: int, params: list[nn.Parameter]) -> None:
        self.stage = stage
        self.params = params
        self.remaining = 0
        self.work: Any = None
        self.flat: torch.Tensor | None = None
        self.started = 0.0


class GradSync:
    """The gradient all-reduce of one device's stages with their copies in the other
    replicas. Runs on the device thread (hooks fire inside its backward)."""

    def __init__(self, params: dict[int, list[nn.Parameter]], group: Any, size: int,
                 timeout: float, bucket_bytes: int = BUCKET_BYTES) -> None:
        self.group = group
        self.size = size
        self.timeout = datetime.timedelta(seconds=timeout)
        self._buckets: list[_Bucket] = []
        self._of: dict[nn.Parameter, _Bucket] = {}
        self._handles: list[Any] = []
        for stage, stage_params in sorted(params.items()):
            current: list[nn.Parameter] = []
            size_bytes = 0
            for p in reversed([p for p in stage_params if p.requires_grad]):
                current.append(p)
                size_bytes += p.numel() * p.element_size()
                if size_bytes >= bucket_bytes:
                    self._add(stage, current)
                    current, size_bytes = [], 0
            if current:
                self._add(stage, current)
        for p in self._of:
            hook: Any = p.register_post_accumulate_grad_hook
            self._handles.append(hook(self._accumulated))

    def _add(self, stage: int, params: list[nn.Parameter]) -> None:
        bucket = _Bucket(stage, params)
        self._buckets.append(bucket)
        for p in params:
            self._of[p] = bucket

    def reset(self) -> None:
        """A new step: forget reductions a failed step left behind."""
        for bucket in self._buckets:
            bucket.remaining = 0
            bucket.work = bucket.flat = None

    def arm(self, stage: int) -> None:
        """The next backward of ``stage`` is its last in this step."""
        for bucket in self._buckets:
            if bucket.stage == stage:
                bucket.remaining = len(bucket.params)

    def _accumulated(self, p: torch.Tensor) -> None:
        bucket = self._of.get(p)  # type: ignore[call-overload]
        if bucket is None or bucket.remaining <= 0:
            return
        bucket.remaining -= 1
        if bucket.remaining == 0:
            self._start(bucket)

    def flush(self, stage: int) -> None:
        """The last backward of ``stage`` is done: reduce what is left (parameters the
        backward did not reach keep their gradient, or its absence, on every replica)."""
        for bucket in self._buckets:
            if bucket.stage == stage and bucket.work is None:
                self._start(bucket)

    def _start(self, bucket: _Bucket) -> None:
        bucket.remaining = 0
        grads = [p.grad for p in bucket.params if p.grad is not None]
        if not grads:
            bucket.work = _Done()
            return
        bucket.flat = torch.cat([g.reshape(-1) for g in grads])
        bucket.started = time.time()
        bucket.work = self.group.allreduce([bucket.flat])

    def wait(self) -> list[list[Any]]:
        """Wait for every reduction, write the averages back; trace spans."""
        spans = []
        for bucket in self._buckets:
            if bucket.work is None:
                self._start(bucket)
            bucket.work.wait(self.timeout)
            flat = bucket.flat
            if flat is not None:
                flat.div_(self.size)
                offset = 0
                for p in bucket.params:
                    if p.grad is None:
                        continue
                    n = p.grad.numel()
                    p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
                    offset += n
                spans.append([bucket.stage, "allreduce", -1, bucket.started, time.time()])
            bucket.work = bucket.flat = None
        return spans

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        abort = getattr(self.group, "abort", None)
        if abort is not None:
            with contextlib.suppress(RuntimeError):  # broken by a lost peer already
                abort()


class _Done:
    def wait(self, timeout: datetime.timedelta) -> bool:
        return True
