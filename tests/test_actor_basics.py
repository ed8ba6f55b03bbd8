from __future__ import annotations

import pytest

import shardline as sl
from tests.actors_fixtures import Counter

pytestmark = pytest.mark.anyio


async def test_design_example() -> None:
    async with sl.Node() as node:
        c = await node.spawn(Counter, 5, name="counter")
        assert isinstance(c, sl.ActorRef)
        assert await c.incr(2) == 7
        assert await c.ask("incr", 1, timeout=2.0) == 8
        await c.tell("incr", 1)
        assert await c.get() == 9
        assert node.ref("counter") == c
        await c.stop()
        with pytest.raises(sl.ActorStopped):
            await c.incr(1)


async def test_kwargs_and_sync_methods() -> None:
    async with sl.Node() as node:
        c = await node.spawn(Counter, start=10)
        assert await c.incr(by=5) == 15
        assert await c.get() == 15
        assert await c.incr.ask(by=1, timeout=1.0) == 16
        await c.incr.tell(4)
        assert await c.get() == 20


async def test_duplicate_name_is_refused_and_freed_after_stop() -> None:
    async with sl.Node() as node:
        first = await node.spawn(Counter, name="c")
        with pytest.raises(sl.ActorNameTaken, match="'c'"):
            await node.spawn(Counter, name="c")
        assert issubclass(sl.ActorNameTaken, sl.ShardlineError)
        await first.stop()
        second = await node.spawn(Counter, 3, name="c")
        assert second != first
        assert await node.ref("c").get() == 3


async def test_unknown_names_and_methods() -> None:
    async with sl.Node() as node:
        c = await node.spawn(Counter)
        with pytest.raises(sl.ActorNotFound):
            node.ref("nobody")
        with pytest.raises(sl.MethodNotFound, match="nope"):
            await c.ask("nope")
        with pytest.raises(sl.MethodNotFound):
            await c.ask("_secret")
        with pytest.raises(sl.MethodNotFound):
            await c.ask("on_start")
        with pytest.raises(AttributeError):
            c._secret  # noqa: B018
        assert await c.incr() == 1  # the actor is unaffected


async def test_remote_exception_becomes_actor_error_and_actor_keeps_running() -> None:
    async with sl.Node() as node:
        c = await node.spawn(Counter)
        with pytest.raises(sl.ActorError) as info:
            await c.fail("bad input")
        err = info.value
        assert err.type_name == "ValueError"
        assert err.message == "bad input"
        assert "raise ValueError(message)" in err.remote_traceback
        assert isinstance(err.__cause__, ValueError)
        assert await c.incr() == 1


async def test_spawn_rejects_non_actor() -> None:
    class NotAnActor:
        pass

    async with sl.Node() as node:
        with pytest.raises(TypeError, match=r"subclass of shardline\.Actor"):
            await node.spawn(NotAnActor)  # type: ignore[arg-type]


async def test_spawn_outside_running_node() -> None:
    node = sl.Node()
    with pytest.raises(RuntimeError, match="async with"):
        await node.spawn(Counter)


async def test_refs_are_values() -> None:
    class Forwarder(sl.Actor):
        async def via(self, target: sl.ActorRef, by: int) -> int:
            return await target.incr(by)  # type: ignore[no-any-return]

        async def me(self) -> sl.ActorRef:
            return self.ref

    async with sl.Node() as node:
        c = await node.spawn(Counter)
        f = await node.spawn(Forwarder, name="fwd")
        assert await f.via(c, 3) == 3
        assert await f.me() == f
        assert {f: 1}[node.ref("fwd")] == 1
        assert "fwd" in repr(f)


async def test_actor_can_spawn_children_through_its_node() -> None:
    class Parent(sl.Actor):
        async def child(self) -> sl.ActorRef:
            return await self.node.spawn(Counter, 41)

    async with sl.Node() as node:
        p = await node.spawn(Parent)
        kid = await p.child()
        assert await kid.incr() == 42
        assert len(node.actors()) == 2


async def test_on_start_failure_fails_spawn_and_frees_name() -> None:
    class Broken(sl.Actor):
        async def on_start(self) -> None:
            raise RuntimeError("no GPU here")

    class BadInit(sl.Actor):
        def __init__(self) -> None:
            raise KeyError("cfg")

    async with sl.Node() as node:
        with pytest.raises(sl.ActorError, match="no GPU here") as info:
            await node.spawn(Broken, name="b")
        assert info.value.type_name == "RuntimeError"
        with pytest.raises(sl.ActorError, match="KeyError"):
            await node.spawn(BadInit, name="b")
        assert await (await node.spawn(Counter, name="b")).incr() == 1


async def test_statistics() -> None:
    async with sl.Node() as node:
        await node.spawn(Counter, name="c", mailbox_size=7)
        stats = node.statistics()
        assert stats["actors"][0]["name"] == "c"
        assert stats["actors"][0]["mailbox_size"] == 7
        assert stats["actors"][0]["mailbox_used"] == 0


async def test_bad_spawn_options() -> None:
    async with sl.Node() as node:
        with pytest.raises(ValueError, match="mailbox_size"):
            await node.spawn(Counter, mailbox_size=0)
        with pytest.raises(ValueError, match="on_error"):
            await node.spawn(Counter, on_error="ignore")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="max_restarts"):
            await node.spawn(Counter, max_restarts=-1)


def test_run_returns_the_result() -> None:
    async def main() -> int:
        async with sl.Node() as node:
            c = await node.spawn(Counter, 1)
            return await c.incr()  # type: ignore[no-any-return]

    assert sl.run(main()) == 2
    assert sl.run(main, use_uvloop=False) == 2


async def test_to_thread_keeps_the_loop_free() -> None:
    import threading

    def blocking() -> int:
        return threading.get_ident()

    assert await sl.to_thread(blocking) != threading.get_ident()
