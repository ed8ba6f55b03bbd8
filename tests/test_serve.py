"""`shardline serve` as a user runs it: a subprocess with worker processes, driven over
HTTP by the official openai client and by httpx."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import openai
import pytest
import torch

from shardline.models import minilm
from tests.serve_fixtures import Server

pytestmark = pytest.mark.anyio

KEY = "sk-test-key"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("serve") / "err.log", "--stages", "2",
               "--api-key", KEY)
    try:
        yield s
    finally:
        s.close()


def headers(key: str | None = KEY) -> dict[str, str]:
    return {} if key is None else {"Authorization": f"Bearer {key}"}


def test_openai_client_gets_embeddings(server: Server) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    texts = ["The cat sits on the mat.", "Pipelines split models into stages."]
    expected = minilm.model()(minilm.tokenize(texts)).detach()
    # Left to itself the client asks for base64 and decodes it; "float" is plain JSON.
    for extra in ({}, {"encoding_format": "float"}):
        result = client.embeddings.create(model="minilm", input=texts, **extra)
        got = torch.tensor([d.embedding for d in sorted(result.data, key=lambda d: d.index)])
        assert torch.nn.functional.cosine_similarity(got, expected, dim=1).min() >= 0.9999
        assert result.usage.prompt_tokens > 0
    assert [m.id for m in client.models.list()] == ["minilm"]


async def test_many_concurrent_requests_are_batched(server: Server) -> None:
    statuses: list[int] = []
    async with httpx.AsyncClient(base_url=server.url, headers=headers(),
                                 timeout=60) as client:
        async def one(i: int) -> None:
            r = await client.post("/v1/embeddings",
                                  json={"model": "minilm", "input": f"request number {i}"})
            statuses.append(r.status_code)
            assert len(r.json()["data"][0]["embedding"]) == 384

        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(one, i)
        metrics = (await client.get("/metrics")).text
    assert statuses == [200] * 200
    values = {line.split(" ")[0]: float(line.split(" ")[1])
              for line in metrics.splitlines() if line and not line.startswith("#")}
    batches = values["shardline_batch_size_count"]
    assert batches < 200  # so some batch held more than one request
    assert values['shardline_batch_size_bucket{le="1.0"}'] < batches
    assert values['shardline_requests_total{endpoint="/v1/embeddings",status="200"}'] >= 200
    assert values['shardline_stage_busy_seconds{device="0"}'] > 0
    assert "shardline_queue_depth" in values
    assert "shardline_request_seconds_bucket" in metrics


def test_bad_requests_get_their_status_and_the_server_keeps_serving(server: Server) -> None:
    url = f"{server.url}/v1/embeddings"
    good = {"model": "minilm", "input": "fine"}
    cases = [
        (headers(), b"{not json", 400),
        (headers(), json.dumps([1, 2]).encode(), 400),
        (headers(), json.dumps({"input": "x"}).encode(), 400),
        (headers(), json.dumps({"model": "gpt-9", "input": "x"}).encode(), 404),
        (headers(), json.dumps({"model": "minilm", "input": []}).encode(), 400),
        (headers(), json.dumps({"model": "minilm", "input": [1, 2]}).encode(), 400),
        (headers(), json.dumps({"model": "minilm", "input": "word " * 400}).encode(), 400),
        (headers(), json.dumps({**good, "encoding_format": "yaml"}).encode(), 400),
        (headers(None), json.dumps(good).encode(), 401),
        (headers("sk-wrong"), json.dumps(good).encode(), 401),
    ]
    with httpx.Client(timeout=60) as client:
        for hdrs, body, status in cases:
            r = client.post(url, content=body,
                            headers={**hdrs, "Content-Type": "application/json"})
            assert r.status_code == status, (body[:60], r.text)
            error = r.json()["error"]
            assert error["message"] and error["type"]
        r = client.post(url, json=good, headers=headers())
        assert r.status_code == 200
        assert client.get(f"{server.url}/healthz").json()["status"] == "ok"
        assert client.get(f"{server.url}/nowhere").status_code == 404


async def test_a_full_queue_answers_429_and_recovers(tmp_path: Path) -> None:
    s = Server(tmp_path / "err.log", "--stages", "1", "--workers", "0", "--max-queue", "2",
               "--max-batch", "1", "--max-wait-ms", "0")
    try:
        statuses: list[int] = []
        async with httpx.AsyncClient(base_url=s.url, timeout=60) as client:
            async def one(i: int) -> None:
                r = await client.post("/v1/embeddings", json={
                    "model": "minilm", "input": f"a somewhat longer request {i} " * 20})
                statuses.append(r.status_code)
                if r.status_code == 429:
                    assert r.json()["error"]["type"] == "rate_limit_error"

            async with anyio.create_task_group() as tg:
                for i in range(60):
                    tg.start_soon(one, i)
            assert set(statuses) <= {200, 429} and 429 in statuses and 200 in statuses
            r = await client.post("/v1/embeddings", json={"model": "minilm", "input": "ok"})
            assert r.status_code == 200
    finally:
        s.close()
