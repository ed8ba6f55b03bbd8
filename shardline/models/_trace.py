"""What a pipeline did, step by step: every forward, backward, send and receive, per
device, with microbatch ids, as measured by the devices themselves."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

__all__ = ["StepTrace", "Trace", "TraceSpan"]


@dataclass(frozen=True)
class TraceSpan:
    device: int
    stage: int
    kind: str
    """"F" / "B" (compute), "send" (encoding and handing an output to the link),
    "recv" (an input arrived: ``start == end``), "opt" (the optimizer step)."""
    mb: int
    start: float
    """Seconds since the epoch, from the device's own clock."""
    end: float


@dataclass(frozen=True)
class StepTrace:
    step: int
    what: str
    """"train" or "infer"."""
    start: float
    """When the scheduler sent the step out and got the last result back."""
    end: float
    spans: tuple[TraceSpan, ...] = field(repr=False)

    @property
    def n_devices(self) -> int:
        return 1 + max((s.device for s in self.spans), default=-1)

    def durations(self) -> dict[tuple[int, str, int], float]:
        """Compute time of each forward and backward, keyed ``(stage, kind, mb)``: what
        ``schedules.simulate(..., durations=)`` takes to give this step's ideal."""
        return {(s.stage, s.kind, s.mb): s.end - s.start
                for s in self.spans if s.kind in ("F", "B")}

    def bubble_fraction(self) -> float:
        """Share of the devices' time in this step spent not computing."""
        busy = sum(s.end - s.start for s in self.spans if s.kind in ("F", "B", "opt"))
        total = self.n_devices * (self.end - self.start)
        return 1 - busy / total if total > 0 else 0.0


@dataclass
class Trace:
    """Steps recorded by ``Pipeline.start(..., trace=True)`` or ``pipe.trace()``."""

    steps: list[StepTrace] = field(default_factory=list)

    @staticmethod
    def from_wire(records: list[dict[str, Any]]) -> Trace:
        steps = []
        for r in records:
            spans = tuple(TraceSpan(int(d), int(s), str(k), int(mb), float(t0), float(t1))
                          for d, device_spans in enumerate(r["devices"])
                          for s, k, mb, t0, t1 in device_spans)
            steps.append(StepTrace(int(r["step"]), str(r["what"]), float(r["start"]),
                                   float(r["end"]), spans))
        return Trace(steps)

    def to_chrome(self, path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
        """Chrome trace-event JSON (opens in Perfetto or chrome://tracing): one process
        row per device, one event per span, times in microseconds from the first step.
        Written to ``path`` when given; returned either way."""
        origin = min((s.start for s in self.steps), default=0.0)
        events: list[dict[str, Any]] = []
        devices = max((s.n_devices for s in self.steps), default=0)
        for d in range(devices):
            events.append({"name": "process_name", "ph": "M", "pid": d, "tid": 0,
                           "args": {"name": f"device {d}"}})
        events.append({"name": "process_name", "ph": "M", "pid": devices, "tid": 0,
                       "args": {"name": "scheduler"}})
        for step in self.steps:
            events.append({"name": f"{step.what} step {step.step}", "cat": "step",
                           "ph": "X", "pid": devices, "tid": 0,
                           "ts": (step.start - origin) * 1e6,
                           "dur": (step.end - step.start) * 1e6})
            for s in step.spans:
                ts = (s.start - origin) * 1e6
                args = {"stage": s.stage, "microbatch": s.mb, "step": step.step}
                if s.kind == "recv":
                    events.append({"name": f"recv mb{s.mb}", "cat": "recv", "ph": "i",
                                   "s": "t", "pid": s.device, "tid": 1, "ts": ts,
                                   "args": args})
                    continue
                name = f"{s.kind}{s.mb}" if s.kind in ("F", "B") else f"{s.kind} mb{s.mb}"
                events.append({"name": name, "cat": s.kind, "ph": "X", "pid": s.device,
                               "tid": 0 if s.kind in ("F", "B", "opt") else 1, "ts": ts,
                               "dur": (s.end - s.start) * 1e6, "args": args})
        doc = {"traceEvents": events, "displayTimeUnit": "ms"}
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                json.dump(doc, f)
        return doc
