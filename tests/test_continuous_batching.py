"""Continuous batching: concurrent ``generate`` calls share decode steps token by token,
and each gets exactly the tokens it gets alone."""

from __future__ import annotations

import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
from torch import nn

import shardline as sl
from shardline.models import Pipeline, PipelineError, gpt, hf
from shardline.models._scheduler import Scheduler

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.anyio

GPT = {"blocks": 3, "dim": 32, "heads": 4, "seq": 64, "vocab": 64, "seed": 5}
VOCAB = 96


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random Llama and GPT-2 checkpoints, saved as ``transformers`` saves them."""
    root = tmp_path_factory.mktemp("hf")
    configs = {
        "llama": transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128),
        "gpt2": transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4,
                                        n_positions=128, bos_token_id=1, eos_token_id=2),
    }
    out = {}
    for family, cfg in configs.items():
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(
            str(root / family))
        out[family] = root / family
    return out


@dataclass
class Request:
    prompt: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    keep: int | None = None      # close the stream after this many tokens
    eos_at: int | None = None    # make the token at this index (alone) the EOS
    eos: list[int] = field(default_factory=list)

    def kwargs(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_p": self.top_p, "seed": self.seed,
                "eos_token_id": self.eos}


def requests(vocab: int) -> list[Request]:
    """Eight requests: prompts of 1 to 23 tokens, 3 to 20 new tokens, greedy and
    sampled, two that stop at an EOS, two closed midway."""
    gen = torch.Generator().manual_seed(11)

    def prompt(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=gen).tolist()

    return [Request(prompt(5), 12),
            Request(prompt(1), 20),
            Request(prompt(23), 9, temperature=1.0, top_p=0.9, seed=3),
            Request(prompt(8), 16, eos_at=5),
            Request(prompt(3), 14, keep=4),
            Request(prompt(12), 3),
            Request(prompt(7), 18, temperature=0.8, seed=9, eos_at=9),
            Request(prompt(16), 15, temperature=1.0, seed=1, keep=7)]


async def take(pipe: Pipeline, r: Request) -> list[int]:
    """``r``'s tokens; a request with ``keep`` stops listening (closes the stream)."""
    out: list[int] = []
    stream = pipe.generate(r.prompt, r.max_new_tokens, **r.kwargs())
    try:
        async for token in stream:
            out.append(token)
            if r.keep is not None and len(out) == r.keep:
                break
    finally:
        await stream.aclose()
    return out


async def alone(pipe: Pipeline, reqs: list[Request]) -> list[list[int]]:
    """Each request by itself, one after the other; picks the EOS of those that stop
    at one (a token that first appears at ``eos_at``)."""
    expected = []
    for r in reqs:
        tokens = await take(pipe, r)
        if r.eos_at is not None:
            # a token seen first at a place before the end, the nearest to eos_at (a
            # random model may repeat itself: then its first token)
            free = tokens
            firsts = [i for i in range(1, len(free) - 1) if free[i] not in free[:i]] or [0]
            eos = free[min(firsts, key=lambda i: abs(i - r.eos_at))]
            r.eos = [eos]
            tokens = await take(pipe, r)
            assert tokens[-1] == eos and len(tokens) < r.max_new_tokens
        expected.append(tokens)
    return expected


async def together(pipe: Pipeline, reqs: list[Request]) -> list[list[int]]:
    got: list[list[int]] = [[] for _ in reqs]

    async def one(i: int) -> None:
        got[i] = await take(pipe, reqs[i])

    async with anyio.create_task_group() as tg:
        for i in range(len(reqs)):
            tg.start_soon(one, i)
    return got


async def cached(pipe: Pipeline) -> list[int]:
    return [await d.cached_requests() for d in pipe.devices]


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 10) -> None:
    """Wait for ``check``: releases are one-way messages."""
    with anyio.fail_after(timeout):
        while not await check():
            await anyio.sleep(0.02)


async def same_tokens_alone_and_together(pipe: Pipeline, vocab: int) -> dict[str, int]:
    """The check every model goes through; returns the decode counters of the
    concurrent run."""
    reqs = requests(vocab)
    expected = await alone(pipe, reqs)
    before = (await pipe.stats())["decode"]
    got = await together(pipe, reqs)
    after = (await pipe.stats())["decode"]
    assert got == expected
    assert [len(t) for t in got] == [12, 20, 9, expected[3].__len__(), 4, 3,
                                     expected[6].__len__(), 7]
    await until(lambda: _all_free(pipe))
    return {k: after[k] - before[k] for k in ("calls", "rows")} | {
        "max_rows": after["max_rows"]}


async def _all_free(pipe: Pipeline) -> bool:
    return all(n == 0 for n in await cached(pipe))


def batched(counters: dict[str, int], n_requests: int) -> None:
    """Proof of batching: decode rows shared pipeline calls."""
    assert counters["max_rows"] >= n_requests // 2
    assert counters["calls"] * 2 <= counters["rows"]


# -- the layers: one batched call equals one call per row ---------------------------------


def _layers(kind: str, checkpoints: dict[str, Path]) -> tuple[list[nn.Module], int]:
    if kind == "gpt":
        return list(gpt.model(GPT).eval()), GPT["vocab"]
    spec = hf.spec(checkpoints[kind])
    return list(spec.build(0, spec.n_layers)), VOCAB


@pytest.mark.parametrize("kind", ["gpt", "llama", "gpt2"])
def test_a_batched_step_equals_one_step_per_row(kind: str,
                                                checkpoints: dict[str, Path]) -> None:
    layers, vocab = _layers(kind, checkpoints)
    lengths = [3, 12, 1, 7, 7]
    gen = torch.Generator().manual_seed(0)
    rows: list[list[dict[str, Any]]] = []
    with torch.inference_mode():
        for n in lengths:  # each request's prompt, alone
            states: list[dict[str, Any]] = [{} for _ in layers]
            x: Any = torch.randint(0, vocab, (1, n), generator=gen)
            for layer, state in zip(layers, states, strict=True):
                x = layer.forward_cached(x, state)
            rows.append(states)
        copies = [[dict(s) for s in states] for states in rows]
        for _ in range(3):  # decode steps
            tokens = torch.randint(0, vocab, (len(lengths), 1), generator=gen)
            x = tokens
            for j, layer in enumerate(layers):
                x = layer.forward_cached_batch(x, [states[j] for states in rows])
            one_by_one = []
            for i, states in enumerate(copies):
                y: Any = tokens[i:i + 1]
                for layer, state in zip(layers, states, strict=True):
                    y = layer.forward_cached(y, state)
                one_by_one.append(y)
            torch.testing.assert_close(x, torch.cat(one_by_one), atol=1e-5, rtol=1e-5)


# -- pipelines -------------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stages", [1, 3])
async def test_concurrent_generates_equal_one_at_a_time_demo_gpt(stages: int) -> None:
    async with sl.Node() as node:
        pipe = await Pipeline.start(node, gpt.spec(GPT), stages=stages)
        try:
            counters = await same_tokens_alone_and_together(pipe, GPT["vocab"])
        finally:
            await pipe.stop()
    batched(counters, 8)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
async def test_concurrent_generates_equal_one_at_a_time_hf(
        family: str, checkpoints: dict[str, Path]) -> None:
    async with sl.Node() as node:
        pipe = await Pipeline.start(node, hf.spec(checkpoints[family]), stages=2)
        try:
            counters = await same_tokens_alone_and_together(pipe, VOCAB)
        finally:
            await pipe.stop()
    batched(counters, 8)


@pytest.mark.timeout(180)
async def test_concurrent_generates_across_processes(checkpoints: dict[str, Path]) -> None:
    async with sl.LocalCluster(2) as cluster:
        pipe = await Pipeline.start(cluster.node, hf.spec(checkpoints["llama"]),
                                    placement=cluster.nodes)
        try:
            counters = await same_tokens_alone_and_together(pipe, VOCAB)
        finally:
            await pipe.stop()
        batched(counters, 8)
        pipe = await Pipeline.start(cluster.node, gpt.spec(GPT),
                                    placement=[cluster.nodes[1], cluster.nodes[0]])
        try:
            counters = await same_tokens_alone_and_together(pipe, GPT["vocab"])
        finally:
            await pipe.stop()
        batched(counters, 8)


@pytest.mark.timeout(120)
async def test_a_closed_stream_frees_its_cache_on_every_stage_while_others_run() -> None:
    async with sl.LocalCluster(2) as cluster:
        pipe = await Pipeline.start(cluster.node, gpt.spec(GPT),
                                    placement=[cluster.nodes[0], cluster.nodes[1],
                                               cluster.nodes[0]])
        try:
            streams = [pipe.generate([5, 6, 7 + i], 30, eos_token_id=[]) for i in range(3)]
            for s in streams:  # every request holds state on every stage now
                await anext(s)
            assert await cached(pipe) == [3, 3, 3]
            for _ in range(3):
                await anext(streams[1])
            await streams[1].aclose()
            await until(lambda: _counts(pipe, [2, 2, 2]))

            async def cancelled() -> None:
                async for _ in streams[2]:
                    await anyio.sleep(30)  # cancelled while it holds its caches

            with anyio.move_on_after(0.3):
                await cancelled()
            await streams[2].aclose()
            await until(lambda: _counts(pipe, [1, 1, 1]))
            rest = [t async for t in streams[0]]
            assert len(rest) == 29
            await until(lambda: _all_free(pipe))
        finally:
            await pipe.stop()


async def _counts(pipe: Pipeline, expected: list[int]) -> bool:
    return await cached(pipe) == expected


@pytest.mark.timeout(120)
async def test_one_failing_request_fails_alone() -> None:
    """A request that outgrows the model's context fails (one in its decode steps, one
    already in the prefill call it shares); the requests that share their calls go on
    with their own tokens."""
    async with sl.Node() as node:
        pipe = await Pipeline.start(node, gpt.spec(GPT), stages=2)
        try:
            prompts = [[1, 2, 3], list(range(3, 3 + 56)), [9, 8], list(range(1, 71))]
            expected = []
            for p in (prompts[0], prompts[2]):
                expected.append([t async for t in pipe.generate(p, 20, eos_token_id=[])])
            results: dict[int, Any] = {}

            async def one(i: int) -> None:
                try:
                    results[i] = [t async for t in pipe.generate(prompts[i], 20,
                                                                 eos_token_id=[])]
                except PipelineError as exc:
                    results[i] = exc

            async with anyio.create_task_group() as tg:
                for i in range(4):
                    tg.start_soon(one, i)
            assert [results[0], results[2]] == expected
            for failed, tokens in ((results[1], 65), (results[3], 70)):
                assert isinstance(failed, PipelineError)
                assert f"sequence of {tokens} tokens exceeds the model's context of 64" \
                    in str(failed)
                assert failed.stage == 0
            stats = await pipe.stats()
            assert stats["decode"]["max_rows"] == 3 and stats["prefill"]["max_rows"] == 4
            await until(lambda: _all_free(pipe))
        finally:
            await pipe.stop()


class RowByRow(nn.Module):
    """A block that only knows the one-request cached forward."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.block(x)
        return out

    def forward_cached(self, x: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        out: torch.Tensor = self.block.forward_cached(x, state)
        return out


@pytest.mark.timeout(120)
async def test_a_layer_without_a_batched_forward_runs_row_by_row() -> None:
    net = gpt.model(GPT).eval()
    mixed = nn.Sequential(*[RowByRow(m) if isinstance(m, gpt.Block) and i == 2 else m
                            for i, m in enumerate(net)])
    async with sl.Node() as node:
        reference = await Pipeline.start(node, gpt.spec(GPT), stages=2)
        pipe = await Pipeline.start(node, mixed, stages=2)
        try:
            reqs = requests(GPT["vocab"])
            expected = await alone(reference, reqs)
            assert await together(pipe, reqs) == expected
            batched((await pipe.stats())["decode"], 8)
        finally:
            await pipe.stop()
            await reference.stop()


@pytest.mark.timeout(120)
async def test_a_long_prompt_is_prefilled_in_chunks_apart_from_the_decodes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    long_prompt = list(range(1, 41))
    async with sl.Node() as node:
        reference = await Pipeline.start(node, gpt.spec(GPT), stages=2)
        try:
            expected = [t async for t in reference.generate(long_prompt, 6,
                                                            eos_token_id=[])]
            short = [t async for t in reference.generate([4, 5], 40, eos_token_id=[])]
        finally:
            await reference.stop()
        monkeypatch.setattr(Scheduler, "prefill_chunk", 8)
        pipe = await Pipeline.start(node, gpt.spec(GPT), stages=2)
        try:
            running = pipe.generate([4, 5], 40, eos_token_id=[])
            got_short = [await anext(running)]
            got_long: list[int] = []

            async def long_one() -> None:
                got_long.extend([t async for t in pipe.generate(long_prompt, 6,
                                                                eos_token_id=[])])

            async def short_one() -> None:
                got_short.extend([t async for t in running])

            async with pipe.trace() as trace, anyio.create_task_group() as tg:
                tg.start_soon(short_one)
                tg.start_soon(long_one)
            assert got_long == expected and got_short == short
            kinds = [s.what for s in trace.steps]
            assert kinds.count("prefill") == 5  # the 40-token prompt, 8 at a time
            first, last = kinds.index("prefill"), len(kinds) - 1 - kinds[::-1].index("prefill")
            assert "decode" in kinds[first:last]  # the running request went on meanwhile
        finally:
            await pipe.stop()


@pytest.mark.timeout(120)
async def test_prompts_arriving_together_share_prefill_calls(
        checkpoints: dict[str, Path]) -> None:
    """Prompts of different lengths go through in one call (right-padded rows), and
    give the tokens they give alone."""
    async with sl.Node() as node:
        pipe = await Pipeline.start(node, hf.spec(checkpoints["llama"]), stages=2)
        try:
            reqs = requests(VOCAB)
            expected = await alone(pipe, reqs)
            before = (await pipe.stats())["prefill"]
            assert await together(pipe, reqs) == expected
            after = (await pipe.stats())["prefill"]
            assert after["rows"] - before["rows"] == len(reqs)
            assert after["calls"] - before["calls"] < len(reqs)
            assert after["max_rows"] > 1
        finally:
            await pipe.stop()


@pytest.mark.timeout(120)
async def test_replicas_batch_their_own_requests() -> None:
    """With two replicas, each request stays on the replica that holds its state; a
    step runs the rows of each replica as one batch there."""
    async with sl.Node() as node:
        reference = await Pipeline.start(node, gpt.spec(GPT), stages=2)
        pipe = await Pipeline.start(node, gpt.spec(GPT), replicas=2,
                                    placement=[["cpu", "cpu"], ["cpu", "cpu"]])
        try:
            reqs = requests(GPT["vocab"])
            expected = await alone(reference, reqs)
            assert await together(pipe, reqs) == expected
            decode = (await pipe.stats())["decode"]
            batched(decode, 4)
            assert decode["max_rows"] <= 4  # requests alternate: 4 on each replica
            for r in range(2):
                await until(lambda r=r: _none_cached(pipe.replica_devices(r)))
        finally:
            await pipe.stop()
            await reference.stop()


async def _none_cached(devices: list[Any]) -> bool:
    return [await d.cached_requests() for d in devices] == [0] * len(devices)


GPT_HEAL = {"blocks": 2, "dim": 32, "heads": 4, "seq": 64, "vocab": 64, "seed": 3}


@pytest.mark.timeout(180)
async def test_batched_streams_survive_the_loss_of_a_stage() -> None:
    """Every stream of a batch whose stage was lost is replayed into the new stage and
    goes on with the tokens it would have produced."""
    prompts = [[5, 9, 2, 7], [1, 2], [3, 4, 5, 6, 7, 8], [10]]
    async with sl.Node() as driver, sl.LocalCluster(3, node=driver) as cluster:
        pipe = await Pipeline.start(driver, gpt.spec(GPT_HEAL), placement=cluster.nodes[:2],
                                    spares=cluster.nodes[2:])
        try:
            expected = []
            for p in prompts:
                expected.append([t async for t in pipe.generate(p, 24, eos_token_id=[])])
            got: list[list[int]] = [[] for _ in prompts]

            async def one(i: int) -> None:
                async for token in pipe.generate(prompts[i], 24, eos_token_id=[]):
                    got[i].append(token)
                    if i == 0 and len(got[i]) == 10:
                        os.kill(cluster.pids()[1], signal.SIGKILL)

            async with anyio.create_task_group() as tg:
                for i in range(len(prompts)):
                    tg.start_soon(one, i)
            stats = await pipe.stats()
            await until(lambda: _all_free(pipe))
        finally:
            await pipe.stop()
    assert got == expected
    (record,) = stats["recoveries"]
    assert record["from"] == "fresh"
    assert stats["decode"]["max_rows"] == len(prompts)


async def test_decode_needs_a_prefilled_request() -> None:
    async with sl.Node() as node:
        pipe = await Pipeline.start(node, gpt.spec(GPT), stages=2)
        try:
            with pytest.raises(sl.ActorError, match="no cached state"):
                await pipe.scheduler.decode("nobody", 3)
            with pytest.raises(ValueError, match="temperature"):
                await anext(pipe.generate([1], 3, temperature=-1))
        finally:
            await pipe.stop()


# -- the queues alone ------------------------------------------------------------------------


async def test_a_decode_step_waits_for_its_rows_only_once() -> None:
    """After a step, the next waits (briefly) for the rows of the last one; one that is
    not back in time joins a later step, and is not waited for again."""
    from shardline.models._batching import DecodeBatcher

    starts: list[int] = []

    async def start() -> None:
        starts.append(1)

    batcher = DecodeBatcher(start, join_wait_s=0.05)
    results: dict[str, Any] = {}

    async def ask(cache: str, token: int) -> None:
        results[cache] = await batcher.submit(cache, [token])

    async with anyio.create_task_group() as tg:
        tg.start_soon(ask, "a", 1)
        tg.start_soon(ask, "b", 2)
        while batcher.waiting < 2:
            await anyio.sleep(0.001)
        rows = await batcher.next_rows()
        assert [r.cache for r in rows] == ["a", "b"] and starts == [1]
        for row in rows:
            row.done.set_result(row.tokens[0] * 10)
        batcher.finished(rows)
    assert results == {"a": 10, "b": 20}
    async with anyio.create_task_group() as tg:
        tg.start_soon(ask, "a", 3)  # b's consumer is slow: it does not come back
        rows = await batcher.next_rows()
        assert [r.cache for r in rows] == ["a"]
        rows[0].done.set_result(30)
        batcher.finished(rows)
    async with anyio.create_task_group() as tg:
        tg.start_soon(ask, "b", 4)
        rows = await batcher.next_rows()
        assert [r.cache for r in rows] == ["b"]  # a is not back: after the window
        rows[0].done.set_result(40)
        batcher.finished(rows)
    batcher.leave("a")
    batcher.leave("b")
    assert await batcher.next_rows() == [] and not batcher.running


async def test_prefill_calls_take_chunks_within_the_budget() -> None:
    from shardline.models._batching import PrefillQueue

    async def start() -> None:
        return None

    queue = PrefillQueue(start, chunk=4, budget=8)
    prompts = {"long": list(range(10)), "mid": list(range(5)), "short": [7]}
    done: dict[str, Any] = {}

    async def ask(cache: str) -> None:
        done[cache] = await queue.submit(cache, prompts[cache])

    calls: list[list[tuple[str, list[int]]]] = []
    async with anyio.create_task_group() as tg:
        for cache in prompts:
            tg.start_soon(ask, cache)
        while queue.waiting < 3:
            await anyio.sleep(0.001)
        while rows := await queue.next_rows():
            calls.append([(r.cache, r.chunk) for r in rows])
            for row in rows:
                if row.offset + row.take == len(row.tokens):
                    row.done.set_result(len(calls))
            queue.finished(rows)
    # at most 4 tokens of a prompt per call, at most 8 padded tokens per call, and a
    # prompt with tokens left goes first in the next call
    assert calls == [[("long", [0, 1, 2, 3]), ("mid", [0, 1, 2, 3])],
                     [("long", [4, 5, 6, 7]), ("mid", [4])],
                     [("long", [8, 9]), ("short", [7])]]
    assert done == {"long": 3, "mid": 2, "short": 3}
