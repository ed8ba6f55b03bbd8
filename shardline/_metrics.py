"""Prometheus metrics of a node's actor system (``Node(metrics=True)``).

Counters live as plain ints on the actor cells and peers and are read when Prometheus
scrapes, so the message path pays an integer add for them; only ask latencies are
recorded as they happen, and only when metrics are on.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .actors._looplag import BUCKETS as LAG_BUCKETS

if TYPE_CHECKING:
    from .actors._node import Node

__all__ = ["NodeMetrics"]

_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
            0.5, 1.0, 2.5, 5.0, 10.0)


class NodeMetrics:
    """Per actor: messages in, replies out, mailbox depth; ask latency (histogram);
    per peer: bytes sent and received; peers alive; the event loop's lag (histogram);
    replies queued toward clients, refused and clients dropped. ``text()`` is the
    exposition."""

    def __init__(self, node: Node) -> None:
        try:
            from prometheus_client import CollectorRegistry
        except ImportError:
            raise ImportError("Node(metrics=True) needs prometheus_client: "
                              "pip install 'shardline[metrics]'") from None
        self._node = node
        self._counts = [0] * (len(_BUCKETS) + 1)
        self._sum = 0.0
        self.recoveries: dict[str, int] = {}
        self.nonfinite_losses = 0
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def count_recovery(self, what: str) -> None:
        """A recovery happened: ``what`` was lost and replaced ("stage": a pipeline's
        stages moved to another node; "worker": a worker process restarted)."""
        self.recoveries[what] = self.recoveries.get(what, 0) + 1

    def count_nonfinite(self, losses: int) -> None:
        self.nonfinite_losses += losses

    def observe_ask(self, seconds: float) -> None:
        self._counts[bisect.bisect_left(_BUCKETS, seconds)] += 1
        self._sum += seconds

    def time_ask(self, fut: asyncio.Future[Any]) -> None:
        started = time.monotonic()
        fut.add_done_callback(lambda _: self.observe_ask(time.monotonic() - started))

    def text(self) -> str:
        """The Prometheus text exposition of every metric (what ``/metrics`` serves)."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve /metrics on ``port`` (0: any free one) from a background thread;
        returns the port."""
        from prometheus_client import start_http_server

        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        node = self._node
        cells = list(node._cells.values())  # copied at once: scrapes run on a thread
        msgs = CounterMetricFamily("shardline_actor_messages_in",
                                   "Messages an actor took from its mailbox", labels=["actor"])
        replies = CounterMetricFamily("shardline_actor_messages_out",
                                      "Asks an actor answered", labels=["actor"])
        depth = GaugeMetricFamily("shardline_actor_mailbox_depth",
                                  "Messages waiting in an actor's mailbox", labels=["actor"])
        for cell in cells:
            stats = cell.statistics()
            msgs.add_metric([cell.label], stats["messages_in"])
            replies.add_metric([cell.label], stats["replies"])
            depth.add_metric([cell.label], stats["mailbox_used"] + stats["overflow"])
        yield msgs
        yield replies
        yield depth
        yield HistogramMetricFamily("shardline_ask_seconds",
                                    "Ask round trips made from this node (local and remote)",
                                    buckets=_cumulative(_BUCKETS, self._counts),
                                    sum_value=self._sum)
        peers = node.peers()
        sent = CounterMetricFamily("shardline_peer_bytes_sent",
                                   "Bytes sent on the connection to a peer", labels=["peer"])
        received = CounterMetricFamily("shardline_peer_bytes_received",
                                       "Bytes received on the connection to a peer",
                                       labels=["peer"])
        for peer in peers:
            sent.add_metric([peer.address], peer.bytes_sent)
            received.add_metric([peer.address], peer.bytes_received)
        yield sent
        yield received
        yield GaugeMetricFamily("shardline_peers_alive", "Connections to live peers",
                                value=sum(1 for p in peers if not p.is_lost))
        lag = node.loop_lag
        yield HistogramMetricFamily(
            "shardline_loop_lag_seconds",
            "How late the node's event loop ran a timer (a long synchronous call shows here)",
            buckets=_cumulative(LAG_BUCKETS, lag.counts), sum_value=lag.total)
        yield GaugeMetricFamily("shardline_loop_lag_max_seconds",
                                "Largest event loop lag since the node started", value=lag.max)
        recovered = CounterMetricFamily("shardline_recoveries",
                                        "Failures recovered from, by what was replaced",
                                        labels=["what"])
        for what, count in sorted(self.recoveries.items()):
            recovered.add_metric([what], count)
        yield recovered
        yield CounterMetricFamily("shardline_nonfinite_losses",
                                  "Training microbatch losses that were NaN or infinite",
                                  value=self.nonfinite_losses)
        endpoint = node._endpoint
        out = None if endpoint is None else endpoint.outgoing_statistics()
        if out is not None:
            yield GaugeMetricFamily("shardline_outgoing_queued_bytes",
                                    "Bytes of replies queued toward clients, not yet written",
                                    value=out["queued_bytes"])
            yield CounterMetricFamily("shardline_outgoing_replies_refused",
                                      "Replies answered with an error: their client had "
                                      "max_queued_bytes unread", value=out["replies_refused"])
            yield CounterMetricFamily("shardline_outgoing_clients_dropped",
                                      "Clients dropped for reading nothing while over "
                                      "max_queued_bytes", value=out["clients_dropped"])


def _cumulative(bounds: tuple[float, ...], counts: list[int]) -> list[tuple[str, int]]:
    running, buckets = 0, []
    for bound, count in zip((*bounds, float("inf")), counts, strict=True):
        running += count
        buckets.append((str(bound) if bound != float("inf") else "+Inf", running))
    return buckets
