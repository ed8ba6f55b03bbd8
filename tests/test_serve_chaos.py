"""Chaos for `shardline serve` (issue 12): a steady load from 8 clients while a random
worker is SIGKILLed every few seconds (each kill once the server is whole again: failures
independent, as in a fleet). With --replicas 2 not one request fails; without, the only
failures are 503s with Retry-After in the gaps, and /healthz comes back each time."""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from tests.serve_fixtures import Server

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(240)]

SECONDS = 50.0   # of load, after the server is up: the whole run stays under 2 minutes
CLIENTS = 8


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Chaos:
    def __init__(self, server: Server, request: tuple[str, dict[str, Any]]) -> None:
        self.server = server
        self.path, self.body = request
        self.statuses: Counter[int] = Counter()
        self.bad: list[str] = []  # failures that are not a 503 with Retry-After
        self.kills = 0
        self.rng = random.Random(12)

    async def client(self, http: httpx.AsyncClient, until: float) -> None:
        while time.monotonic() < until:
            r = await http.post(self.path, json=self.body)
            self.statuses[r.status_code] += 1
            if r.status_code == 503:
                if "Retry-After" not in r.headers or \
                        r.json()["error"]["type"] != "server_error":
                    self.bad.append(f"503 without Retry-After: {r.text[:200]}")
                await anyio.sleep(float(r.headers.get("Retry-After", 1)))
            elif r.status_code != 200:
                self.bad.append(f"{r.status_code}: {r.text[:200]}")

    async def killer(self, http: httpx.AsyncClient, until: float) -> None:
        while time.monotonic() < until - 15:  # the last kill has time to heal
            await self.healthy(http)
            await anyio.sleep(2.0 + self.rng.random() * 2)
            self.server.kill_worker(self.rng)
            self.kills += 1
            await anyio.sleep(0.5)  # the loss is noticed before /healthz is asked again
        await self.healthy(http)

    async def healthy(self, http: httpx.AsyncClient, timeout: float = 90.0) -> None:
        with anyio.fail_after(timeout):  # a bound against a hang, not a timing target
            while (await http.get("/healthz")).status_code != 200:
                await anyio.sleep(0.2)

    async def run(self) -> None:
        until = time.monotonic() + SECONDS
        async with httpx.AsyncClient(base_url=self.server.url, timeout=120) as http, \
                anyio.create_task_group() as tg:
            for _ in range(CLIENTS):
                tg.start_soon(self.client, http, until)
            tg.start_soon(self.killer, http, until)


# MiniLM's stages hold over 16 MiB each: rebuilding a copy from its sibling moves that
# state as one reply larger than the reply window, and takes long enough (seconds) for
# the next kill to land in the middle of it.
@pytest.mark.parametrize(("model", "route", "body"), [
    ("gpt", "/v1/completions", {"model": "gpt", "prompt": "Once upon a time",
                                "max_tokens": 8, "temperature": 0}),
    ("minilm", "/v1/embeddings", {"model": "minilm",
                                  "input": ["a steady load", "of two texts"]}),
])
async def test_with_replicas_no_request_fails_while_workers_die(
        tmp_path: Path, model: str, route: str, body: dict[str, Any]) -> None:
    s = Server(tmp_path / "err.log", "--model", model, "--stages", "2", "--replicas", "2")
    try:
        chaos = Chaos(s, (route, body))
        await chaos.run()
        assert chaos.kills >= 3
        assert chaos.bad == [] and set(chaos.statuses) == {200}, chaos.statuses
        assert s.recoveries("worker") == chaos.kills
        assert s.errors() == []
    finally:
        s.close()


async def test_without_replicas_the_gaps_are_503s_with_retry_after(tmp_path: Path) -> None:
    s = Server(tmp_path / "err.log", "--stages", "2")
    try:
        chaos = Chaos(s, ("/v1/embeddings", {"model": "minilm",
                                             "input": ["a steady load", "of two texts"]}))
        await chaos.run()
        assert chaos.kills >= 3
        assert chaos.bad == [], chaos.bad[:5]
        assert set(chaos.statuses) <= {200, 503} and chaos.statuses[200] > 0, chaos.statuses
        assert s.recoveries("worker") == chaos.kills
        assert s.recoveries("stage") == chaos.kills
        assert s.errors() == []
    finally:
        s.close()
