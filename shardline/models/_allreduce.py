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
Each replica scales its loss by 1 / replicas, so the sum is the average; every replica
receives the same bits (a ring all-reduce computes each element's sum once and copies
it), so replicas stay bitwise identical.
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
    __slots__ = ("flat", "params", "remaining", "stage", "started", "views", "work")

    def __init__(self, stage: int, params: list[nn.Parameter]) -> None:
        self.stage = stage
        self.params = params
        self.remaining = 0
        self.work: Any = None
        self.started = 0.0
        # The gradients live in one flat buffer (DDP's gradient_as_bucket_view): the
        # backward accumulates straight into it, and it is reduced in place, with no
        # copy in or out.
        first = params[0]
        self.flat = torch.zeros(sum(p.numel() for p in params), dtype=first.dtype,
                                device=first.device)
        self.views: list[torch.Tensor] = []
        offset = 0
        for p in params:
            self.views.append(self.flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()


class GradSync:
    """The gradient all-reduce of one device's stages with their copies in the other
    replicas. Runs on the device thread (hooks fire inside its backward). The losses
    are scaled by 1 / replicas, so the sum the group computes is the average."""

    def __init__(self, params: dict[int, list[nn.Parameter]], group: Any, size: int,
                 timeout: float, bucket_bytes: int = BUCKET_BYTES) -> None:
        self.group = group
        self.size = size
        self.timeout = datetime.timedelta(seconds=timeout)
        self._buckets: list[_Bucket] = []
        self._of: dict[nn.Parameter, _Bucket] = {}
        self._handles: list[Any] = []
        for stage, stage_params in sorted(params.items()):
            trainable = [p for p in stage_params if p.requires_grad]
            for kind in sorted({(str(p.dtype), str(p.device)) for p in trainable}):
                current: list[nn.Parameter] = []
                size_bytes = 0
                for p in reversed(trainable):
                    if (str(p.dtype), str(p.device)) != kind:
                        continue
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
        self.zero()

    def _add(self, stage: int, params: list[nn.Parameter]) -> None:
        bucket = _Bucket(stage, params)
        self._buckets.append(bucket)
        for p in params:
            self._of[p] = bucket

    def zero(self) -> None:
        """A new step: zero gradients (in their buckets), forget reductions a failed
        step left behind."""
        for bucket in self._buckets:
            bucket.flat.zero_()
            for p, view in zip(bucket.params, bucket.views, strict=True):
                p.grad = view
            bucket.remaining = 0
            bucket.work = None

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
        """The last backward of ``stage`` is done: reduce what is left (buckets whose
        parameters the backward did not all reach)."""
        for bucket in self._buckets:
            if bucket.stage == stage and bucket.work is None:
                self._start(bucket)

    def _start(self, bucket: _Bucket) -> None:
        bucket.remaining = 0
        for p, view in zip(bucket.params, bucket.views, strict=True):
            if p.grad is not view:  # replaced (set to None, or a new tensor): take it in
                if p.grad is not None:
                    view.copy_(p.grad)
                p.grad = view
        bucket.started = time.time()
        bucket.work = self.group.allreduce([bucket.flat])

    def wait(self) -> list[list[Any]]:
        """Wait for every reduction; returns trace spans."""
        spans = []
        for bucket in self._buckets:
            if bucket.work is None:
                self._start(bucket)
            bucket.work.wait(self.timeout)
            bucket.work = None
            spans.append([bucket.stage, "allreduce", -1, bucket.started, time.time()])
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
