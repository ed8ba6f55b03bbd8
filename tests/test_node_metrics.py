"""Node(metrics=True) and `shardline node --metrics-port`: Prometheus text that reflects
what the actors and peers did."""

from __future__ import annotations

import signal
import subprocess
import sys

import httpx
import pytest

import shardline as sl
from tests.actors_fixtures import Counter

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def values(text: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


async def test_node_metrics_count_messages_asks_and_bytes() -> None:
    async with sl.Node(metrics=True) as node, sl.LocalCluster(1, allow=["tests"],
                                                              node=node) as cluster:
        local = await node.spawn(Counter, name="local")
        for _ in range(5):
            await local.incr()
        await local.tell("incr")
        remote = await cluster.nodes[0].spawn("tests.actors_fixtures:Counter")
        for _ in range(3):
            await remote.incr()
        await local.get()
        assert node.metrics is not None
        got = values(node.metrics.text())
    assert got['shardline_actor_messages_in_total{actor="local"}'] == 7
    assert got['shardline_actor_messages_out_total{actor="local"}'] == 6
    assert got['shardline_actor_mailbox_depth{actor="local"}'] == 0
    assert got["shardline_ask_seconds_count"] >= 9  # 6 local + 3 remote (+ spawn)
    assert got['shardline_ask_seconds_bucket{le="+Inf"}'] == got["shardline_ask_seconds_count"]
    peer = [k for k in got if k.startswith("shardline_peer_bytes_sent_total")]
    assert len(peer) == 1 and got[peer[0]] > 0
    assert got[peer[0].replace("sent", "received")] > 0
    assert got["shardline_peers_alive"] == 1


def test_metrics_off_by_default_and_cli_serves_them() -> None:
    assert sl.Node().metrics is None
    proc = subprocess.Popen([sys.executable, "-m", "shardline.cli", "node", "--metrics-port",
                             "0"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline().split()
        assert banner[0:2] == ["shardline", "node"]
        url = next(w for w in banner if w.startswith("metrics=")).removeprefix("metrics=")
        body = httpx.get(url, timeout=10).text
        assert "shardline_peers_alive 0.0" in body and "shardline_ask_seconds_bucket" in body
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        if proc.stdout is not None:
            proc.stdout.close()
