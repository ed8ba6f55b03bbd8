"""`shardline serve` heals itself (issue 12): a killed worker is restarted, the stages it
held are rebuilt, /healthz is 200 again with nobody acting; requests in the gap get 503
with Retry-After; with replicas a kill costs no request; a stream goes on with exactly
the tokens it would have produced; every recovery is counted and traced."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import anyio
import httpx
import pytest
import torch

import shardline as sl
from shardline.models import LayerSpec, Pipeline
from shardline.serve import Recovery, ServeMetrics
from tests.serve_fixtures import Server, sse, unavailable_properly

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(240)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_a_killed_worker_is_replaced_and_the_server_heals(tmp_path: Path) -> None:
    s = Server(tmp_path / "err.log", "--stages", "2")
    try:
        with httpx.Client(base_url=s.url, timeout=60) as client:
            assert client.get("/healthz").status_code == 200
            body = {"model": "minilm", "input": "a sentence to embed"}
            expected = client.post("/v1/embeddings", json=body).json()["data"]
            s.kill_worker()
            time.sleep(0.5)  # the cluster notices at once; rebuilding takes seconds
            # in the gap: 503 that says when to come back
            health = client.get("/healthz")
            assert health.status_code == 503, health.text
            assert health.json()["status"] == "unavailable"
            assert int(health.headers["Retry-After"]) >= 1
            answer = client.post("/v1/embeddings", json=body)
            assert answer.status_code == 200 or unavailable_properly(answer), answer.text
            s.wait_healthy()
            assert client.post("/v1/embeddings", json=body).json()["data"] == expected
            trace = client.get("/trace").json()["traceEvents"]
        assert s.recoveries("worker") == 1 and s.recoveries("stage") == 1
        spans = [e for e in trace if e["ph"] == "X"]
        assert {e["name"] for e in spans} == {"worker restarted", "stages rebuilt"}
        assert all(e["dur"] > 0 for e in spans)
        restarted = next(e for e in spans if e["name"] == "worker restarted")
        assert restarted["args"]["cause"] == "killed by SIGKILL"
        log = s.log.read_text()
        assert "killed by SIGKILL; replacing it" in log and "whole again" in log
        assert s.errors() == []
    finally:
        s.close()


async def test_with_replicas_a_kill_costs_no_request(tmp_path: Path) -> None:
    s = Server(tmp_path / "err.log", "--model", "gpt", "--stages", "2", "--replicas", "2")
    try:
        assert len(s.workers()) == 4
        statuses: list[int] = []
        async with httpx.AsyncClient(base_url=s.url, timeout=120) as client:
            async def load(i: int, stop: anyio.Event) -> None:
                while not stop.is_set():
                    r = await client.post("/v1/completions", json={
                        "model": "gpt", "prompt": f"client {i}", "max_tokens": 8})
                    statuses.append(r.status_code)

            stop = anyio.Event()
            async with anyio.create_task_group() as tg:
                for i in range(8):
                    tg.start_soon(load, i, stop)
                while len(statuses) < 20:
                    await anyio.sleep(0.05)
                s.kill_worker()
                while s.recoveries("stage") < 1:
                    await anyio.sleep(0.2)
                served = len(statuses)
                while len(statuses) < served + 20:
                    await anyio.sleep(0.05)
                stop.set()
        assert statuses.count(200) == len(statuses), sorted(set(statuses))
        assert s.recoveries("worker") == 1
        assert s.errors() == []
    finally:
        s.close()


def test_a_stream_goes_on_through_a_kill_with_the_same_tokens(tmp_path: Path) -> None:
    s = Server(tmp_path / "err.log", "--model", "gpt", "--stages", "2")
    body = {"model": "gpt", "prompt": "Once upon a time", "max_tokens": 100,
            "temperature": 0, "stream": True}
    try:
        with httpx.Client(base_url=s.url, timeout=120) as client:
            undisturbed = client.post("/v1/completions", json=body).text
            before = s.metrics()["shardline_completion_tokens_total"]
            with client.stream("POST", "/v1/completions", json=body) as stream:
                received = []
                for line in stream.iter_lines():
                    received.append(line)
                    if len(received) == 3:  # the first event is in: the stream is on
                        unfinished = s.metrics()["shardline_completion_tokens_total"]
                        os.kill(s.workers()[-1], signal.SIGKILL)
                text = "\n".join(received) + "\n"
        assert unfinished == before  # counted when a completion ends: this one had not
        events = sse(text)
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        got = "".join(e["choices"][0]["text"] for e in events)
        assert got == "".join(e["choices"][0]["text"] for e in sse(undisturbed))
        assert s.recoveries("stage") == 1
        assert s.errors() == []
        assert "untrained" in s.log.read_text()  # plain `--model gpt` says what it is
    finally:
        s.close()


async def test_a_busy_pipeline_is_healthy_and_a_silent_one_is_not() -> None:
    """The health check's call may wait behind a saturating load; it is excused when
    real calls got through every stage meanwhile, and only then."""
    spec = LayerSpec("tests.models_fixtures:layers", {"n": 2}, 2)
    async with sl.Node() as node:
        pipe = await Pipeline.start(node, spec, stages=1)
        stuck = anyio.Event()  # a health call that waits behind everything, for good

        async def probe() -> None:
            await stuck.wait()

        recovery = Recovery("m", pipe, ServeMetrics(), probe)
        async with recovery:
            with pytest.raises(TimeoutError):
                await recovery.check(0.3)  # nothing else got through: not healthy
            recovery.progress(time.monotonic())  # a call that came out before the check
            with pytest.raises(TimeoutError):
                await recovery.check(0.3)  # says nothing of the stages since
            async with anyio.create_task_group() as tg:
                async def late(since: float) -> None:
                    await anyio.sleep(0.1)
                    recovery.progress(since)

                tg.start_soon(late, time.monotonic() - 60)  # went in long ago
                with pytest.raises(TimeoutError):
                    await recovery.check(0.3)  # it may have passed a stage before it died
                tg.start_soon(late, time.monotonic() - 0.2)  # went in just before
                await recovery.check(0.3)  # queued ahead of the check: the stages move
            async with anyio.create_task_group() as tg:
                async def busy() -> None:
                    while not stuck.is_set():
                        since = time.monotonic()
                        await pipe(torch.randn(4, 8))
                        recovery.progress(since)
                        await anyio.sleep(0.01)

                tg.start_soon(busy)
                await recovery.check(0.3)  # slow, but the pipeline is moving: healthy
                stuck.set()
            await recovery.check(0.3)  # the call itself came back
        await pipe.stop()
