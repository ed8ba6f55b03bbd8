"""Decode steps run ahead: a greedy request's next step goes out while the step it goes
on from is in flight, its input handed from the last stage to the first; the tokens
stay those of one request at a time."""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any

import anyio
import pytest
import torch
from anyio.abc import TaskGroup

import shardline as sl
from shardline.models import LayerSpec, Pipeline, PipelineError, gpt, quantize
from shardline.models._batching import DecodeBatcher, Diverged
from shardline.models._device import STALE_STEPS, Device
from shardline.models._rows import pick_tokens
from shardline.models._scheduler import Scheduler
from shardline.models._stage import _with_feed

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]

GPT = {"blocks": 3, "dim": 32, "heads": 4, "seq": 96, "vocab": 64, "seed": 5}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def greedy(pipe: Pipeline, prompt: list[int], n: int) -> list[int]:
    return [t async for t in pipe.generate(prompt, n, eos_token_id=[])]


PROMPTS = [[3, 5, 7], [9], [1, 2, 3, 4, 5, 6, 7, 8], [11, 12], [20, 21, 22], [30],
           [40, 41, 42, 43], [50, 51]]


@pytest.mark.parametrize("groups", [1, 2])
async def test_greedy_streams_run_ahead_and_get_their_tokens_alone(
        groups: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every step after a stream's first runs ahead (its token from the last stage),
    with one chain of requests or two, across processes; the tokens are those of each
    stream alone."""
    monkeypatch.setattr(Scheduler, "decode_groups", groups)
    monkeypatch.setattr(Scheduler, "decode_min_rows", 2)
    async with sl.LocalCluster(2) as cluster:
        pipe = await Pipeline.start(cluster.node, gpt.spec(GPT), placement=cluster.nodes)
        try:
            alone = [await greedy(pipe, p, 24) for p in PROMPTS]
            before = (await pipe.stats())["decode"]
            got: list[list[int]] = [[] for _ in PROMPTS]

            async def one(i: int) -> None:
                got[i] = await greedy(pipe, PROMPTS[i], 24)

            async with anyio.create_task_group() as tg:
                for i in range(len(PROMPTS)):
                    tg.start_soon(one, i)
            after = (await pipe.stats())["decode"]
        finally:
            await pipe.stop()
    assert got == alone
    rows = after["rows"] - before["rows"]
    ahead = after["ahead_rows"] - before["ahead_rows"]
    assert ahead >= rows // 2  # most rows took their token from the last stage
    assert (after["calls"] - before["calls"]) * 2 <= rows  # and still shared steps


async def test_a_stream_that_stops_early_leaves_the_others_their_tokens() -> None:
    """A request run ahead past its end (an EOS, a closed stream) costs that one row;
    its cache is freed and the others go on."""
    async with sl.Node() as node:
        pipe = await Pipeline.start(node, gpt.spec(GPT), stages=2)
        try:
            alone = [await greedy(pipe, p, 20) for p in PROMPTS[:4]]
            eos = alone[1][6]
            stop_at = alone[1].index(eos) + 1
            got: list[list[int]] = [[] for _ in range(4)]

            async def one(i: int) -> None:
                if i == 1:
                    got[i] = [t async for t in pipe.generate(PROMPTS[i], 20,
                                                             eos_token_id=eos)]
                elif i == 2:
                    stream = pipe.generate(PROMPTS[i], 20, eos_token_id=[])
                    async for t in stream:
                        got[i].append(t)
                        if len(got[i]) == 5:
                            break
                    await stream.aclose()
                else:
                    got[i] = await greedy(pipe, PROMPTS[i], 20)

            async with anyio.create_task_group() as tg:
                for i in range(4):
                    tg.start_soon(one, i)
            with anyio.fail_after(10):
                while [await d.cached_requests() for d in pipe.devices] != [0, 0]:
                    await anyio.sleep(0.02)
        finally:
            await pipe.stop()
    assert got[0] == alone[0] and got[3] == alone[3]
    assert got[1] == alone[1][:stop_at]
    assert got[2] == alone[2][:5]


# -- the batcher alone -------------------------------------------------------------------


async def _started() -> None:
    return None


async def test_a_greedy_row_runs_ahead_while_its_step_is_in_flight() -> None:
    batcher = DecodeBatcher(_started, join_wait_s=0.05)
    first: list[Any] = []

    async def ask() -> None:
        first.append(await batcher.submit("a", [7], greedy=True, more=True))

    async with anyio.create_task_group() as tg:
        tg.start_soon(ask)
        while batcher.waiting < 1:
            await anyio.sleep(0.001)
        (step,) = [await batcher.next_rows()]
        assert [r.cache for r in step] == ["a"] and step[0].feed_from is None
        # The step is still in flight: the next one already goes out, from its token.
        (row,) = await batcher.next_rows()
        assert row.cache == "a" and row.feed_from is step[0]
        step[0].done.set_result(8)
        batcher.finished(step)
    assert first == [8]
    row.done.set_result(9)
    assert await batcher.submit("a", [8], greedy=True, more=False) == 9
    with pytest.raises(Diverged):  # nothing else ran ahead: a normal row again
        batcher._ahead["a"] = row  # as if it had, from token 8
        await batcher.submit("a", [5], greedy=True)


async def test_rows_that_sample_or_end_do_not_run_ahead() -> None:
    for greedy_row, more in ((False, True), (True, False)):
        batcher = DecodeBatcher(_started)
        async with anyio.create_task_group() as tg:
            step = await _first_step(batcher, tg, greedy_row, more)
            with anyio.move_on_after(0.05) as scope:
                await batcher.next_rows()  # only once its step is back
            assert scope.cancelled_caught
            step[0].done.set_result(2)
            batcher.finished(step)


async def test_a_row_that_leaves_is_not_run_ahead_again() -> None:
    batcher = DecodeBatcher(_started)
    async with anyio.create_task_group() as tg:
        step = await _first_step(batcher, tg, True, True)
        ahead = await batcher.next_rows()
        batcher.leave("a")
        step[0].done.set_result(2)
        batcher.finished(step)
        ahead[0].fail(LookupError("released"))  # nobody claims it: no warning either
        batcher.finished(ahead)
    assert await batcher.next_rows() == [] and not batcher.running


# -- the stages' side --------------------------------------------------------------------


def test_the_first_stage_takes_each_row_from_the_tokens_it_was_sent() -> None:
    ids = torch.tensor([[0], [42], [0]])
    fed = torch.tensor([5, 6, 7])
    assert _with_feed(ids, [2, -1, 0], fed).tolist() == [[7], [42], [5]]
    assert _with_feed(torch.zeros(3, 1, dtype=torch.int64), [0, 1, 2],
                      fed).tolist() == [[5], [6], [7]]
    with pytest.raises(ValueError, match="do not match"):
        _with_feed(ids, [3, -1, 0], fed)


def test_argmax_of_the_last_stage_is_torchs() -> None:
    logits = torch.randn(6, 1, 500)
    logits[1, 0, 10] = logits[1, 0, 20] = logits[1].max() + 1  # a tie: the first
    logits[2, 0, 30] = logits[2, 0, 40] = float("nan")  # a NaN: the first
    logits[3] = float("-inf")
    out = pick_tokens(logits, [True, True, True, True, False, True])
    assert out["tokens"].tolist() == logits[:, -1].argmax(-1).tolist()
    assert torch.equal(out["logits"], logits[4:5, -1])


def test_inputs_of_a_step_that_never_came_are_dropped_in_time() -> None:
    dev = Device("t", "token", None, send_timeout=1.0)
    try:
        for step in range(70):
            dev.deliver((step, "F", 0, 0), step)
        dev.deliver((STALE_STEPS + 60, "F", 0, 0), "new")
        assert sorted(k[0] for k in dev._inbox) == [*range(60, 70), STALE_STEPS + 60]
    finally:
        dev.close()


# -- balancing by cost ---------------------------------------------------------------------


def test_layer_costs_balance_the_stages_and_travel_with_the_spec() -> None:
    spec = LayerSpec("shardline.models.gpt:layers", {}, 4, costs=(1, 5, 5, 10))
    assert spec.costs == (1.0, 5.0, 5.0, 10.0)
    assert LayerSpec.from_wire(spec.to_wire()) == spec
    with pytest.raises(ValueError, match="positive"):
        LayerSpec("a:b", {}, 2, costs=(1.0, 0.0))
    with pytest.raises(ValueError, match="one per layer"):
        LayerSpec("a:b", {}, 2, costs=(1.0,))


async def test_a_spec_with_costs_puts_the_heavy_layer_alone() -> None:
    """Also once compressed: the compressed spec keeps the costs of the one it wraps."""
    base = gpt.spec(GPT)
    costs = (1.0, *[1.0] * GPT["blocks"], 100.0)
    spec = quantize(LayerSpec(base.factory, base.config, base.n_layers, base.weights,
                              costs), "int8").model
    assert spec.costs == costs
    async with sl.Node() as node:
        pipe = await Pipeline.start(node, spec, stages=2)
        try:
            assert pipe.plan.bounds == ((0, base.n_layers - 1),
                                        (base.n_layers - 1, base.n_layers))
        finally:
            await pipe.stop()


async def test_a_step_run_ahead_from_a_failed_one_fails_as_it_did() -> None:
    """The last stage stops while a stream runs ahead: its step fails, and the step run
    ahead from it is given up at once (its first stage would wait for tokens that never
    come), so the stream ends with the error instead of hanging."""
    async with sl.Node() as node:
        pipe = await Pipeline.start(node, gpt.spec(GPT), stages=2)
        try:
            stream = pipe.generate([1, 2, 3], 30, eos_token_id=[])
            assert len([await anext(stream) for _ in range(3)]) == 3
            await pipe.devices[1].stop()  # every later step fails
            with anyio.fail_after(30), pytest.raises((PipelineError, sl.ShardlineError)):
                async for _ in stream:
                    pass
            await stream.aclose()
        finally:
            await pipe.stop()


async def test_rows_wait_for_claims_only_while_their_step_runs() -> None:
    """The next step waits for the callers of the step before to claim their rows run
    ahead as long as the newest step is in flight, and no longer than ``join_wait_s``
    once it is back."""
    batcher = DecodeBatcher(_started, join_wait_s=0.02)
    loop = asyncio.get_running_loop()
    async with anyio.create_task_group() as tg:
        step, ahead = await _a_step_and_the_one_run_ahead(batcher, tg)
        assert [r.feed_from for r in ahead] == step
        tg.start_soon(batcher.submit, "a", [2], True, True)  # b's caller is slow
        with anyio.move_on_after(0.1) as scope:
            await batcher.next_rows()
        assert scope.cancelled_caught  # the step in flight could not go sooner
        for row in ahead:
            row.done.set_result(3)
        batcher.finished(ahead)
        t0 = loop.time()
        nxt = await batcher.next_rows()
        assert loop.time() - t0 < 1.0
        assert [r.cache for r in nxt] == ["a"] and nxt[0].feed_from is ahead[0]
        batcher.leave("a")
        batcher.leave("b")
        nxt[0].fail(LookupError("released"))
        batcher.finished(nxt)
        tg.cancel_scope.cancel()


async def test_a_request_that_joined_a_step_run_ahead_from_a_failed_one_is_replayed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A step fails at its last stage for a request A; the step run ahead from it, which
    X joined meanwhile, is given up too. A's error stands (a stage raised); X's says
    its request can be replayed (``recovered``), since its state may be half updated."""
    from shardline.models._stage import StageActor

    original = StageActor._forward_rows
    seen = {"A": 0}

    def flaky(self: StageActor, stage: int, x: Any, cache_ids: list[str],
              errors: dict[int, str], lengths: list[int] | None,
              greedy: list[bool] | None = None) -> Any:
        if lengths is None and stage == self.n_stages - 1 and cache_ids == ["A"]:
            seen["A"] += 1
            if seen["A"] == 2:  # A's step run ahead: slow, then the stage raises
                time.sleep(0.3)
                raise RuntimeError("boom for A's batch")
        return original(self, stage, x, cache_ids, errors, lengths, greedy)

    monkeypatch.setattr(StageActor, "_forward_rows", flaky)
    async with sl.Node() as node:
        pipe = await Pipeline.start(node, gpt.spec(GPT), stages=2)
        s = pipe.scheduler
        try:
            first_a = await s.prefill("A", [1, 2, 3], True)
            first_x = await s.prefill("X", [4, 5], True)
            second_a = await s.decode("A", first_a, True, True)  # the next runs ahead
            out: dict[str, BaseException] = {}

            async def decode(name: str, token: int) -> None:
                with pytest.raises(sl.ActorError) as caught:
                    await s.decode(name, token, True, True)
                out[name] = caught.value.__cause__  # type: ignore[assignment]

            async with anyio.create_task_group() as tg:
                tg.start_soon(decode, "X", first_x)  # joins while A's step is in flight
                await anyio.sleep(0.05)
                tg.start_soon(decode, "A", second_a)
        finally:
            await pipe.stop()
    assert isinstance(out["A"], PipelineError) and not out["A"].recovered
    assert "boom" in str(out["A"])
    assert isinstance(out["X"], PipelineError) and out["X"].recovered


async def test_memory_stays_flat_while_requests_keep_running_ahead() -> None:
    """Rows and calls let go of the ones before them once their step is over: a
    pipeline that never stops decoding does not keep every row it ever ran."""
    from shardline.models._batched import Call
    from shardline.models._batching import Row

    def live() -> int:
        gc.collect()
        return sum(type(o) in (Row, Call) for o in gc.get_objects())

    async with sl.Node() as node:
        pipe = await Pipeline.start(node, gpt.spec(GPT), stages=2)
        counts = []
        try:
            async def stream(i: int, started: anyio.Event) -> None:
                n = 0
                async for _ in pipe.generate([1 + i, 2], 30, eos_token_id=[]):
                    n += 1
                    if n == 15:
                        started.set()  # the next request starts: decoding never pauses

            async with anyio.create_task_group() as tg:
                for i in range(9):
                    started = anyio.Event()
                    tg.start_soon(stream, i, started)
                    await started.wait()
                    counts.append(live())
            ahead = (await pipe.stats())["decode"]["ahead_rows"]
        finally:
            await pipe.stop()
    assert ahead > 100
    assert max(counts) <= 12, counts


async def test_a_released_request_is_not_waited_for() -> None:
    """A request that stops (its EOS) never claims the row run ahead for it: the next
    step does not wait for that claim."""
    batcher = DecodeBatcher(_started, join_wait_s=10)
    async with anyio.create_task_group() as tg:
        _, ahead = await _a_step_and_the_one_run_ahead(batcher, tg)
        batcher.leave("b")  # b's EOS: it never claims
        tg.start_soon(batcher.submit, "a", [2], True, True)
        with anyio.fail_after(1):
            nxt = await batcher.next_rows()  # while `ahead` is still in flight
        assert [r.cache for r in nxt] == ["a"]
        for row in ahead:  # a claimed its own: it gets its token; b's is dropped
            if row.cache == "a":
                row.done.set_result(3)
            else:
                row.fail(LookupError("released"))
        nxt[0].fail(LookupError("released"))  # nobody claimed it
        batcher.finished(ahead)
        batcher.finished(nxt)
        batcher.leave("a")
        tg.cancel_scope.cancel()


async def _a_step_and_the_one_run_ahead(batcher: DecodeBatcher, tg: TaskGroup
                                        ) -> tuple[list[Any], list[Any]]:
    """Greedy requests a and b in one step, the step run ahead from it, then the first
    step back with token 2 for both."""
    tg.start_soon(batcher.submit, "a", [1], True, True)
    tg.start_soon(batcher.submit, "b", [1], True, True)
    while batcher.waiting < 2:
        await anyio.sleep(0.001)
    step = await batcher.next_rows()
    ahead = await batcher.next_rows()
    for row in step:
        row.done.set_result(2)
    batcher.finished(step)
    return step, ahead


async def _first_step(batcher: DecodeBatcher, tg: TaskGroup, greedy: bool,
                      more: bool) -> list[Any]:
    """Request a's token 1 in the batcher's first step."""
    tg.start_soon(batcher.submit, "a", [1], greedy, more)
    while batcher.waiting < 1:
        await anyio.sleep(0.001)
    return await batcher.next_rows()
