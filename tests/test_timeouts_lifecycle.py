from __future__ import annotations

import asyncio
import time

import anyio
import pytest

import shardline as sl
from tests.actors_fixtures import Counter, Sleeper

pytestmark = pytest.mark.anyio


async def test_ask_timeout_fires_at_the_deadline_and_unwedges_the_actor() -> None:
    async with sl.Node() as node:
        s = await node.spawn(Sleeper)
        t0 = time.monotonic()
        with pytest.raises(sl.AskTimeout) as info:
            await s.ask("hang", timeout=0.2)
        elapsed = time.monotonic() - t0
        assert isinstance(info.value, TimeoutError)
        assert 0.2 - 0.005 <= elapsed <= 0.25, elapsed
        # the abandoned handler was cancelled, so the actor answers again
        assert (await s.ask("stats", timeout=1.0))["cancelled"] == 1


async def test_cancelled_caller_cancels_its_handler_only() -> None:
    async with sl.Node() as node:
        s = await node.spawn(Sleeper)
        with anyio.move_on_after(0.05) as scope:
            await s.hang()
        assert scope.cancelled_caught
        assert await s.nap(0) == 0
        assert await s.stats() == {"peak": 0, "handled": 1, "cancelled": 1, "active": 0}


async def test_timed_out_queued_message_is_skipped() -> None:
    gate = anyio.Event()
    async with sl.Node() as node:
        s = await node.spawn(Sleeper)
        async with anyio.create_task_group() as tg:
            tg.start_soon(s.wait, gate)
            await anyio.wait_all_tasks_blocked()
            with pytest.raises(sl.AskTimeout):
                await s.ask("nap", 0, timeout=0.02)  # queued behind wait(): never started
            gate.set()
        assert (await s.stats())["handled"] == 1  # wait() only; the nap was dropped


async def test_asks_without_timeout_can_be_abandoned_by_a_cancel_scope() -> None:
    async with sl.Node() as node:
        c = await node.spawn(Counter)
        for _ in range(50):  # cancel races at every point of the round trip
            with anyio.move_on_after(0):
                await c.incr()
        assert await c.get() <= 50
        assert await c.incr() >= 1


async def test_stop_fails_queued_asks_and_runs_on_stop() -> None:
    events: list[str] = []

    class Tidy(Sleeper):
        async def on_stop(self) -> None:
            events.append("on_stop")

    gate = anyio.Event()
    results: list[object] = []
    async with sl.Node() as node:
        s = await node.spawn(Tidy)

        async def call(method: str, *args: object) -> None:
            try:
                results.append(await s.ask(method, *args))
            except sl.ActorStopped as exc:
                results.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(call, "wait", gate)       # running when stop() comes
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(call, "nap", 0)           # queued: fails
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(s.stop)
            await anyio.wait_all_tasks_blocked()
            with pytest.raises(sl.ActorStopped):
                await s.nap(0)                       # after stop(): refused at once
            gate.set()
        info = await s.wait_stopped()
    assert info.reason is sl.StopReason.STOPPED and info.error is None
    assert events == ["on_stop"]
    assert results[0] == 1 or results[1] == 1
    assert sum(isinstance(r, sl.ActorStopped) for r in results) == 1


async def test_leaving_the_node_stops_every_actor_and_leaves_no_task() -> None:
    stopped: list[int] = []

    class Tracked(Counter):
        async def on_stop(self) -> None:
            stopped.append(self.value)

    before = set(asyncio.all_tasks())
    async with sl.Node() as node:
        refs = [await node.spawn(Tracked, i) for i in range(5)]
        wide = await node.spawn(type("Wide", (Sleeper,), {"max_concurrency": 3}))
        await wide.nap(0)
    assert sorted(stopped) == [0, 1, 2, 3, 4]
    for ref in refs:
        assert (await ref.wait_stopped()).reason is sl.StopReason.STOPPED
    assert set(asyncio.all_tasks()) == before
    assert node.statistics()["actors"] == []


async def test_node_exit_cancels_a_wedged_actor_after_stop_timeout() -> None:
    async with sl.Node(stop_timeout=0.1) as node:
        s = await node.spawn(Sleeper)
        await s.tell("hang")
        await anyio.wait_all_tasks_blocked()
    assert (await s.wait_stopped()).reason is sl.StopReason.STOPPED


async def test_node_exit_when_the_body_raises() -> None:
    stopped = anyio.Event()

    class Tidy(Counter):
        async def on_stop(self) -> None:
            stopped.set()

    with pytest.raises(KeyError):
        async with sl.Node() as node:
            await node.spawn(Tidy)
            raise KeyError("body failed")
    assert stopped.is_set()


async def test_actor_can_stop_itself() -> None:
    class Quitter(sl.Actor):
        async def quit(self) -> str:
            await self.ref.stop()
            return "bye"

    async with sl.Node() as node:
        q = await node.spawn(Quitter)
        assert await q.quit() == "bye"
        assert (await q.wait_stopped()).reason is sl.StopReason.STOPPED


async def test_on_stop_exceptions_are_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    class Grumpy(Counter):
        async def on_stop(self) -> None:
            raise RuntimeError("cleanup failed")

    async with sl.Node() as node:
        g = await node.spawn(Grumpy)
        await g.stop()
    assert "cleanup failed" in caplog.text


async def test_stop_is_idempotent() -> None:
    async with sl.Node() as node:
        c = await node.spawn(Counter)
        await c.stop()
        await c.stop()
        assert (await c.wait_stopped()).reason is sl.StopReason.STOPPED
