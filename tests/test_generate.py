"""GPT generation through the pipeline (per-stage KV caches) and `/v1/completions`."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import httpx
import openai
import pytest
import torch
from safetensors.torch import load_file

import shardline as sl
from shardline.models import Pipeline, PipelineError, gpt
from tests.serve_fixtures import Server

pytestmark = pytest.mark.anyio

CFG = {"blocks": 3, "dim": 32, "heads": 4, "seq": 48, "vocab": 256, "seed": 3}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def greedy(net: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    out = gpt.generate(net, torch.tensor([prompt]), n, CFG["seq"], temperature=0)
    return [int(t) for t in out[0, len(prompt):]]


@pytest.mark.parametrize("stages", [1, 3])
async def test_cached_generation_equals_recomputing_everything(stages: int) -> None:
    prompt = list(b"The pipeline says")
    net = gpt.model(CFG).eval()
    async with sl.Node() as node:
        pipe = await Pipeline.start(node, gpt.spec(CFG), stages=stages)
        ours = [t async for t in pipe.generate(prompt, 20)]
        assert ours == greedy(net, prompt, 20)
        # sampling: the seed decides, whatever the split
        a = [t async for t in pipe.generate(prompt, 12, temperature=1.0, top_p=0.9, seed=7)]
        b = [t async for t in pipe.generate(prompt, 12, temperature=1.0, top_p=0.9, seed=7)]
        assert a == b
        await anyio.sleep(0.2)  # releases are one-way messages
        assert [await d.cached_requests() for d in pipe.devices] == [0] * stages
        await pipe.stop()


async def test_an_abandoned_generation_frees_its_caches() -> None:
    async with sl.LocalCluster(2) as cluster:
        pipe = await Pipeline.start(cluster.node, gpt.spec(CFG), placement=cluster.nodes)
        tokens = pipe.generate(list(b"abc"), 30)
        assert isinstance(await anext(tokens), int)
        assert [await d.cached_requests() for d in pipe.devices] == [1, 1]
        await tokens.aclose()  # the caller stops early
        with anyio.fail_after(5):
            while [await d.cached_requests() for d in pipe.devices] != [0, 0]:
                await anyio.sleep(0.05)

        async def cancelled() -> None:
            async for _ in pipe.generate(list(b"xyz"), 40):
                await anyio.sleep(10)  # cancelled while holding caches

        with anyio.move_on_after(0.5):
            await cancelled()
        with anyio.fail_after(5):
            while [await d.cached_requests() for d in pipe.devices] != [0, 0]:
                await anyio.sleep(0.05)
        await pipe.stop()


async def test_an_idle_request_is_dropped_and_cannot_continue() -> None:
    async with sl.Node() as node:
        pipe = await Pipeline.start(node, gpt.spec(CFG), stages=2, cache_idle_s=0.3)
        tokens = pipe.generate(list(b"abc"), 30)
        await anext(tokens)
        with anyio.fail_after(5):  # nobody calls: housekeeping frees it
            while [await d.cached_requests() for d in pipe.devices] != [0, 0]:
                await anyio.sleep(0.1)
        with pytest.raises(PipelineError, match="idle"):
            await anext(tokens)
        await tokens.aclose()
        assert len([t async for t in pipe.generate(list(b"abc"), 3)]) == 3
        await pipe.stop()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gpt")

    async def train_and_save() -> None:
        async with sl.Node() as node:
            pipe = await Pipeline.start(node, gpt.spec(CFG), stages=2, microbatches=2,
                                        loss_fn=gpt.loss,
                                        optimizer=("torch.optim.AdamW", {"lr": 0.01}))
            x = torch.tensor([list(b"hello world, hello pipelines!! ")] * 4)
            await pipe.train_step(x[:, :-1], x[:, 1:])
            await pipe.save(str(out))
            await pipe.stop()

    anyio.run(train_and_save)
    return out


def test_completions_from_a_checkpoint_over_http(checkpoint: Path, tmp_path: Path) -> None:
    net = gpt.model(CFG)
    net.load_state_dict(load_file(str(checkpoint / "model.safetensors")))
    net.eval()
    expected = bytes(greedy(net, list(b"hello"), 10)).decode("utf-8", errors="replace")
    server = Server(tmp_path / "err.log", "--model", f"gpt:{checkpoint}", "--stages", "2")
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        done = client.completions.create(model="gpt", prompt="hello", max_tokens=10,
                                         temperature=0)
        assert done.choices[0].text == expected
        assert done.choices[0].finish_reason == "length"
        assert done.usage is not None and done.usage.prompt_tokens == 5
        chunks = list(client.completions.create(model="gpt", prompt="hello", max_tokens=10,
                                                temperature=0, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == expected
        assert chunks[-1].choices[0].finish_reason == "length"
        sampled = [client.completions.create(model="gpt", prompt="hi", max_tokens=8,
                                             temperature=1.0, seed=5).choices[0].text
                   for _ in range(2)]
        assert sampled[0] == sampled[1]
        # a stop sequence ends the text before its first occurrence
        cut = expected[3:5]
        assert len(cut) == 2
        stopped = client.completions.create(model="gpt", prompt="hello", max_tokens=10,
                                            temperature=0, stop=[cut])
        assert stopped.choices[0].text == expected[:expected.find(cut)]
        assert stopped.choices[0].finish_reason == "stop"

        url = f"{server.url}/v1/completions"
        bad = [{"model": "gpt", "prompt": "x" * 60},                  # over the context
               {"model": "gpt", "prompt": ""},
               {"model": "gpt", "prompt": "x", "max_tokens": 0},
               {"model": "gpt", "prompt": "x", "temperature": 5},
               {"model": "gpt", "prompt": "x", "n": 2},
               {"model": "gpt", "prompt": ["a", "b"]},
               {"model": "gpt", "prompt": "x", "stop": [1]}]
        with httpx.Client(timeout=60) as http:
            for body in bad:
                r = http.post(url, json=body)
                assert r.status_code == 400, (body, r.text)
            r = http.post(f"{server.url}/v1/embeddings", json={"model": "gpt", "input": "x"})
            assert r.status_code == 400
            # prompt and completion must fit the context together, as OpenAI has it
            r = http.post(url, json={"model": "gpt", "prompt": "a" * 40, "max_tokens": 100})
            assert r.status_code == 400, r.text
            assert r.json()["error"]["code"] == "context_length_exceeded"
            r = http.post(url, json={"model": "gpt", "prompt": "a" * 40, "max_tokens": 8})
            assert r.status_code == 200  # the room left: 48 - 40 tokens
            assert r.json()["usage"]["completion_tokens"] == 8
            assert http.get(f"{server.url}/healthz").status_code == 200
            metrics = http.get(f"{server.url}/metrics").text
            assert "shardline_completion_tokens_total" in metrics
            lines = [json.loads(line[6:]) for line in http.post(
                url, json={"model": "gpt", "prompt": "hey", "max_tokens": 3, "stream": True}
            ).text.split("\n\n") if line.startswith("data: {")]
            assert len(lines) >= 1 and lines[-1]["choices"][0]["finish_reason"] == "length"
    finally:
        server.close()
