"""Batcher: gathering, splitting, errors, load shedding; and a real pipeline behind it."""

from __future__ import annotations

import time

import anyio
import pytest
import torch

import shardline as sl
from shardline.models import Batcher, Pipeline, QueueFull, minilm

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_requests_are_gathered_and_results_go_back_to_their_callers() -> None:
    seen: list[list[int]] = []

    async def double(items: list[int]) -> list[int]:
        seen.append(items)
        await anyio.sleep(0.01)
        return [2 * i for i in items]

    results: dict[int, int] = {}
    async with Batcher(double, max_batch=4, max_wait_ms=200) as batcher:
        async def one(i: int) -> None:
            results[i] = await batcher(i)

        async with anyio.create_task_group() as tg:
            for i in range(10):
                tg.start_soon(one, i)
        assert batcher.batches == 3
        assert batcher.batch_sizes[4] == 2 and batcher.batch_sizes[2] == 1
    assert results == {i: 2 * i for i in range(10)}
    assert sorted(len(b) for b in seen) == [2, 4, 4]


async def test_a_lone_request_waits_at_most_max_wait() -> None:
    async def echo(items: list[str]) -> list[str]:
        return items

    async with Batcher(echo, max_batch=64, max_wait_ms=50) as batcher:
        t0 = time.monotonic()
        assert await batcher("x") == "x"
        assert time.monotonic() - t0 < 1.0


async def test_a_failing_batch_fails_its_callers_and_the_next_batch_works() -> None:
    async def picky(items: list[int]) -> list[int]:
        if -1 in items:
            raise ValueError("no negatives")
        return items

    async with Batcher(picky, max_batch=2, max_wait_ms=100) as batcher:
        errors: list[BaseException] = []

        async def one(i: int) -> None:
            try:
                await batcher(i)
            except ValueError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(one, -1)
            tg.start_soon(one, 5)
        assert len(errors) == 2
        assert await batcher(7) == 7


async def test_wrong_result_count_is_an_error() -> None:
    async def short(items: list[int]) -> list[int]:
        return items[:-1]

    async with Batcher(short, max_batch=1, max_wait_ms=0) as batcher:
        with pytest.raises(ValueError, match="returned 0 results for 1"):
            await batcher(1)


async def test_full_queue_sheds_load_and_recovers() -> None:
    gate = anyio.Event()

    async def slow(items: list[int]) -> list[int]:
        await gate.wait()
        return items

    async with Batcher(slow, max_batch=1, max_wait_ms=0, max_queue=2,
                       max_inflight=1) as batcher:
        async with anyio.create_task_group() as tg:
            for i in range(3):  # one running, then two waiting
                tg.start_soon(batcher, i)
                await anyio.sleep(0.05)
            assert batcher.depth == 2
            with pytest.raises(QueueFull):
                await batcher(99)
            gate.set()
        assert await batcher(4) == 4


async def test_a_caller_that_gives_up_leaves_no_work() -> None:
    calls: list[list[int]] = []

    async def record(items: list[int]) -> list[int]:
        calls.append(items)
        return items

    async with Batcher(record, max_batch=8, max_wait_ms=300) as batcher:
        with anyio.move_on_after(0.05):
            await batcher(1)
        assert await batcher(2) == 2
    assert calls == [[2]]


async def test_embeddings_through_a_batcher_match_one_call_each() -> None:
    texts = [f"sentence number {i} about {'pipelines ' * (i % 5)}" for i in range(20)]
    async with sl.Node() as node:
        pipe = await Pipeline.start(node, minilm.spec(), stages=2, microbatches=2)

        async def embed(batch: list[str]) -> list[torch.Tensor]:
            return list(await pipe(minilm.tokenize(batch)))

        out: dict[int, torch.Tensor] = {}
        async with Batcher(embed, max_batch=8, max_wait_ms=20) as batcher:
            async def one(i: int) -> None:
                out[i] = await batcher(texts[i])

            async with anyio.create_task_group() as tg:
                for i in range(len(texts)):
                    tg.start_soon(one, i)
            assert batcher.batches < len(texts)
        alone = await pipe(minilm.tokenize(texts))
        await pipe.stop()
    for i in range(len(texts)):
        assert torch.nn.functional.cosine_similarity(out[i], alone[i], dim=0) > 0.99999
