"""What a pipeline did, step by step: every forward, backward, send and receive, per
device, with microbatch ids, as measured by the devices themselves."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

__all__ = ["StepTrace", "Trace", "TraceSpan"]

_COMPUTE = ("F", "B", "I", "W")
_BUSY = (*_COMPUTE, "opt")


@dataclass(frozen=True)
class TraceSpan:
    device: int
    stage: int
    kind: str
    """"F" / "B" / "I" / "W" (compute: forward, full backward, input gradient, weight
    gradient), "send" (encoding and handing an output to the link), "recv" (an input
    arrived: ``start == end``), "opt" (the optimizer step)."""
    mb: int
    start: float
    """Seconds since the epoch, from the device's own clock."""
    end: float
    nbytes: int = 0
    """Of a "send": the bytes it moved to another process (0 within one)."""


@dataclass(frozen=True)
class StepTrace:
    step: int
    what: str
    """"train" or "infer"."""
    start: float
    """When the scheduler sent the step out and got the last result back."""
    end: float
    spans: tuple[TraceSpan, ...] = field(repr=False)
    replicas: int = 1
    """Copies of the pipeline: device ``d`` is device ``d % (n_devices / replicas)`` of
    replica ``d // (n_devices / replicas)``."""

    @property
    def n_devices(self) -> int:
        return 1 + max((s.device for s in self.spans), default=-1)

    def label(self, device: int) -> str:
        if self.replicas <= 1:
            return f"device {device}"
        per = max(1, self.n_devices // self.replicas)
        return f"replica {device // per} device {device % per}"

    def durations(self) -> dict[tuple[int, str, int], float]:
        """Compute time of each ``F``, ``B``, ``I`` and ``W``, keyed ``(stage, kind, mb)``:
        what ``schedules.simulate(..., durations=)`` takes to give this step's ideal, and
        ``schedules.search`` to find a schedule for these costs."""
        return {(s.stage, s.kind, s.mb): s.end - s.start
                for s in self.spans if s.kind in _COMPUTE}

    def idle(self) -> list[tuple[int, float, float]]:
        """``(device, start, end)`` of every stretch in the step when a device computed
        nothing: the bubble, span by span."""
        gaps = []
        for d in range(self.n_devices):
            busy = sorted((s.start, s.end) for s in self.spans
                          if s.device == d and s.kind in _BUSY)
            cursor = self.start
            for start, end in busy:
                if start > cursor:
                    gaps.append((d, cursor, start))
                cursor = max(cursor, end)
            if self.end > cursor:
                gaps.append((d, cursor, self.end))
        return gaps

    def bytes_sent(self) -> int:
        """Bytes of activations and gradients this step moved between processes."""
        return sum(s.nbytes for s in self.spans if s.kind == "send")

    def bubble_fraction(self) -> float:
        """Share of the devices' time in this step spent not computing."""
        busy = sum(s.end - s.start for s in self.spans if s.kind in _BUSY)
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
            spans = tuple(TraceSpan(int(d), int(s), str(k), int(mb), float(t0), float(t1),
                                    int(rest[0]) if rest else 0)
                          for d, device_spans in enumerate(r["devices"])
                          for s, k, mb, t0, t1, *rest in device_spans)
            steps.append(StepTrace(int(r["step"]), str(r["what"]), float(r["start"]),
                                   float(r["end"]), spans, int(r.get("replicas", 1))))
        return Trace(steps)

    def to_chrome(self, path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
        """Chrome trace-event JSON (opens in Perfetto or chrome://tracing): one process
        row per device, one event per span, times in microseconds from the first step.
        Written to ``path`` when given; returned either way."""
        origin = min((s.start for s in self.steps), default=0.0)
        events: list[dict[str, Any]] = []
        devices = max((s.n_devices for s in self.steps), default=0)
        labels = self.steps[-1] if self.steps else StepTrace(0, "", 0.0, 0.0, ())
        for d in range(devices):
            events.append({"name": "process_name", "ph": "M", "pid": d, "tid": 0,
                           "args": {"name": labels.label(d)}})
        events.append({"name": "process_name", "ph": "M", "pid": devices, "tid": 0,
                       "args": {"name": "scheduler"}})
        for step in self.steps:
            events.append({"name": f"{step.what} step {step.step}", "cat": "step",
                           "ph": "X", "pid": devices, "tid": 0,
                           "ts": (step.start - origin) * 1e6,
                           "dur": (step.end - step.start) * 1e6})
            for d, start, end in step.idle():
                events.append({"name": "idle", "cat": "idle", "ph": "X", "pid": d, "tid": 0,
                               "ts": (start - origin) * 1e6, "dur": (end - start) * 1e6,
                               "args": {"step": step.step}})
            for s in step.spans:
                ts = (s.start - origin) * 1e6
                args = {"stage": s.stage, "microbatch": s.mb, "step": step.step}
                if s.kind == "send":
                    args["bytes"] = s.nbytes
                if s.kind == "recv":
                    events.append({"name": f"recv mb{s.mb}", "cat": "recv", "ph": "i",
                                   "s": "t", "pid": s.device, "tid": 1, "ts": ts,
                                   "args": args})
                    continue
                name = f"{s.kind}{s.mb}" if s.kind in _COMPUTE else f"{s.kind} mb{s.mb}"
                events.append({"name": name, "cat": s.kind, "ph": "X", "pid": s.device,
                               "tid": 0 if s.kind in _BUSY else 1, "ts": ts,
                               "dur": (s.end - s.start) * 1e6, "args": args})
        doc = {"traceEvents": events, "displayTimeUnit": "ms"}
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                json.dump(doc, f)
        return doc

    def to_png(self, path: str | os.PathLike[str], *, step: int = -1,
               title: str | None = None) -> None:
        """A Gantt chart of step ``step`` (the last by default); see ``to_png``."""
        to_png(self, path, step=step, title=title)


_COLORS = {"F": "#4C72B0", "B": "#55A868", "I": "#64B5CD", "W": "#CCB974",
           "opt": "#8172B2", "send": "#DD8452", "allreduce": "#C44E52",
           "snapshot": "#937860"}
_LABELS = {"F": "forward", "B": "backward", "I": "input gradient (I)",
           "W": "weight gradient (W)", "opt": "optimizer", "send": "send",
           "allreduce": "gradient all-reduce", "snapshot": "snapshot copy"}
# Drawn as thin bars under the compute: they run beside it (on other threads).
_THIN = ("send", "allreduce")


def to_png(trace: Trace, path: str | os.PathLike[str], *, step: int = -1,
           title: str | None = None) -> None:
    """A Gantt chart of one recorded step, drawn like the GPipe and 1F1B papers' figures:
    one row per device, forward (blue), backward (green), input-gradient (cyan) and
    weight-gradient (olive) boxes labelled with their microbatch, sends as thin orange
    ticks, and the bubble (idle time) hatched in red; the legend names the kinds the
    step ran.
    Needs matplotlib (``pip install 'shardline[viz]'``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        raise ImportError("drawing timelines needs matplotlib: "
                          "pip install 'shardline[viz]'") from None
    if not trace.steps:
        raise ValueError("the trace has no steps")
    st = trace.steps[step]
    n = st.n_devices
    t0 = st.start
    width = (st.end - st.start) * 1e3
    fig, ax = plt.subplots(figsize=(12, 0.7 * n + 1.6), dpi=120)
    for d in range(n):
        row = n - 1 - d  # device 0 on top, as in the papers
        ax.broken_barh([(0, width)], (row + 0.1, 0.8), facecolors="#fbe3e3",
                       edgecolors="#d9534f", hatch="///", linewidth=0)
        for s in st.spans:
            if s.device != d or s.kind not in _COLORS:
                continue
            x, w = (s.start - t0) * 1e3, max((s.end - s.start) * 1e3, width / 2000)
            if s.kind in _THIN:
                ax.broken_barh([(x, w)], (row + 0.1, 0.12), facecolors=_COLORS[s.kind])
                continue
            ax.broken_barh([(x, w)], (row + 0.1, 0.8), facecolors=_COLORS[s.kind],
                           edgecolors="white", linewidth=0.5)
            if s.kind in _COMPUTE and w > width / 60:
                ax.text(x + w / 2, row + 0.5, str(s.mb), ha="center", va="center",
                        color="white", fontsize=8)
    ax.set_yticks([n - 1 - d + 0.5 for d in range(n)], [st.label(d) for d in range(n)])
    ax.set_xlim(0, width)
    ax.set_ylim(0, n)
    ax.set_xlabel("ms since the step started")
    ax.set_title(title or f"{st.what} step {st.step}: bubble {st.bubble_fraction():.0%}")
    ran = {s.kind for s in st.spans}
    handles = [Patch(facecolor=_COLORS[k], label=_LABELS[k])
               for k in (*_COMPUTE, "opt", "snapshot", *_THIN) if k in ran]
    handles.append(Patch(facecolor="#fbe3e3", edgecolor="#d9534f", hatch="///",
                         label="idle (bubble)"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.25),
              ncol=len(handles), frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
