from __future__ import annotations

import anyio
import pytest

import shardline as sl
from shardline.actors._lifecycle import RestartPolicy
from tests.actors_fixtures import Counter, Sleeper

pytestmark = pytest.mark.anyio


async def test_full_mailbox_blocks_tell_until_the_actor_drains_it() -> None:
    gate = anyio.Event()
    async with sl.Node() as node:
        s = await node.spawn(Sleeper, mailbox_size=2)
        await s.tell("wait", gate)   # taken by the worker: running
        await s.tell("wait", gate)   # queued 1/2
        await s.tell("wait", gate)   # queued 2/2
        blocked = anyio.Event()
        done = anyio.Event()

        async def one_more() -> None:
            blocked.set()
            await s.tell("wait", gate)
            done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(one_more)
            await blocked.wait()
            await anyio.wait_all_tasks_blocked()
            assert not done.is_set(), "tell returned although the mailbox was full"
            stats = node.statistics()["actors"][0]
            assert stats["mailbox_used"] == 2
            assert stats["senders_waiting"] == 1
            gate.set()  # the actor drains; the blocked tell gets its slot
            await done.wait()
        assert (await s.stats())["handled"] == 4


async def test_full_mailbox_ask_times_out_waiting_for_space() -> None:
    gate = anyio.Event()
    async with sl.Node() as node:
        s = await node.spawn(Sleeper, mailbox_size=1)
        await s.tell("wait", gate)
        await s.tell("wait", gate)
        with pytest.raises(sl.AskTimeout, match="mailbox"):
            await s.ask("stats", timeout=0.05)
        gate.set()
        assert (await s.stats())["handled"] == 2


async def test_resume_keeps_state() -> None:
    async with sl.Node() as node:
        c = await node.spawn(Counter, 1, on_error="resume")
        await c.incr()
        with pytest.raises(sl.ActorError):
            await c.fail()
        assert await c.get() == 2


async def test_restart_recreates_from_constructor_and_reruns_on_start() -> None:
    class Tracked(Counter):
        starts = 0

        async def on_start(self) -> None:
            type(self).starts += 1

    async with sl.Node() as node:
        c = await node.spawn(Tracked, 10, on_error="restart", max_restarts=3, within=60.0)
        await c.incr(5)
        assert await c.get() == 15
        with pytest.raises(sl.ActorError, match="boom"):
            await c.fail()
        assert await c.get() == 10  # fresh instance from the constructor arguments
        assert Tracked.starts == 2
        assert node.statistics()["actors"][0]["restarts"] == 1


async def test_restart_gives_up_past_max_restarts_within_the_window() -> None:
    async with sl.Node() as node:
        c = await node.spawn(Counter, on_error="restart", max_restarts=2, within=60.0, name="c")
        for _ in range(2):
            with pytest.raises(sl.ActorError):
                await c.fail()
            assert await c.get() == 0  # restarted
        with pytest.raises(sl.ActorError):
            await c.fail()  # third failure within the window: give up
        info = await c.wait_stopped()
        assert info.reason is sl.StopReason.RESTARTS_EXHAUSTED
        assert info.error == "ValueError: boom"
        with pytest.raises(sl.ActorStopped):
            await c.get()
        with pytest.raises(sl.ActorNotFound):
            node.ref("c")


async def test_restart_whose_on_start_fails_counts_towards_the_limit() -> None:
    class Fragile(Counter):
        broken = False

        async def on_start(self) -> None:
            if type(self).broken:
                raise RuntimeError("cannot start")

    async with sl.Node() as node:
        c = await node.spawn(Fragile, on_error="restart", max_restarts=1)
        Fragile.broken = True
        with pytest.raises(sl.ActorError):
            await c.fail()
        info = await c.wait_stopped()
        assert info.reason is sl.StopReason.RESTARTS_EXHAUSTED
        assert info.error == "RuntimeError: cannot start"


async def test_on_error_stop() -> None:
    async with sl.Node() as node:
        c = await node.spawn(Counter, on_error="stop")
        with pytest.raises(sl.ActorError):
            await c.fail("fatal")
        info = await c.wait_stopped()
        assert info.reason is sl.StopReason.FAILED
        assert info.error == "ValueError: fatal"


async def test_failing_tell_applies_supervision() -> None:
    async with sl.Node() as node:
        c = await node.spawn(Counter, on_error="stop")
        await c.tell("fail", "told")
        info = await c.wait_stopped()
        assert info.reason is sl.StopReason.FAILED
        assert info.error == "ValueError: told"


def test_restart_policy_window_arithmetic() -> None:
    policy = RestartPolicy(max_restarts=2, within=10.0)
    assert policy.allow_restart(now=0.0)
    assert policy.allow_restart(now=1.0)
    assert not policy.allow_restart(now=2.0)      # third within 10 s
    assert policy.allow_restart(now=10.5)          # the failure at 0.0 left the window
    assert policy.restarts == 2
    assert not policy.allow_restart(now=10.9)
    assert policy.allow_restart(now=21.0)
    assert not RestartPolicy(0, 1.0).allow_restart(now=0.0)
    with pytest.raises(ValueError):
        RestartPolicy(1, 0.0)
