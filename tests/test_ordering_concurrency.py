from __future__ import annotations

import anyio
import pytest

import shardline as sl
from tests.actors_fixtures import Recorder, Sleeper

pytestmark = pytest.mark.anyio


async def test_per_sender_fifo_under_10000_interleaved_messages() -> None:
    senders, per_sender = 8, 1250  # 10,000 messages
    async with sl.Node() as node:
        rec = await node.spawn(Recorder, mailbox_size=16)  # small: senders block and interleave

        async def sender(sid: int) -> None:
            for seq in range(per_sender):
                if seq % 3 == 0:
                    await rec.tell("record", sid, seq)
                else:
                    assert await rec.record(sid, seq) == seq

        async with anyio.create_task_group() as tg:
            for sid in range(senders):
                tg.start_soon(sender, sid)
        log = await rec.entries()

    assert len(log) == senders * per_sender
    by_sender: dict[int, list[int]] = {}
    for sid, seq in log:
        by_sender.setdefault(sid, []).append(seq)
    for sid in range(senders):
        assert by_sender[sid] == list(range(per_sender)), f"sender {sid} out of order"
    # interleaved, not one sender after another
    assert len({sid for sid, _ in log[: senders * 4]}) > 1


def _stats(node: sl.Node) -> dict[str, int]:
    return node.statistics()["actors"][0]  # type: ignore[no-any-return]


async def test_default_is_one_message_at_a_time() -> None:
    gate = anyio.Event()
    async with sl.Node() as node:
        s = await node.spawn(Sleeper)
        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(s.wait, gate)
            await anyio.wait_all_tasks_blocked()
            assert _stats(node)["running"] == 1
            assert _stats(node)["mailbox_used"] == 4
            gate.set()
        assert await s.stats() == {"peak": 1, "handled": 5, "cancelled": 0, "active": 0}


async def test_max_concurrency_really_overlaps() -> None:
    class Wide(Sleeper):
        max_concurrency = 4

    gate = anyio.Event()
    async with sl.Node() as node:
        w = await node.spawn(Wide)
        async with anyio.create_task_group() as tg:
            for _ in range(6):
                tg.start_soon(w.wait, gate)
            await anyio.wait_all_tasks_blocked()
            assert _stats(node)["running"] == 4
            assert _stats(node)["mailbox_used"] == 2
            gate.set()
        assert await w.stats() == {"peak": 4, "handled": 6, "cancelled": 0, "active": 0}


async def test_bad_max_concurrency() -> None:
    class Zero(sl.Actor):
        max_concurrency = 0

    async with sl.Node() as node:
        with pytest.raises(ValueError, match="max_concurrency"):
            await node.spawn(Zero)
