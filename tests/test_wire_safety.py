"""Bad input from the network: malformed, oversized, wrong version, fuzzed. The node
must answer what it can, drop the rest, and keep serving."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import anyio
import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shardline as sl
from tests.actors_fixtures import Counter

pytestmark = pytest.mark.anyio


class RawClient:
    """A plain pyzmq DEALER speaking (or abusing) the wire protocol by hand."""

    def __init__(self, address: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)

    def send(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        with anyio.fail_after(timeout):
            while True:
                try:
                    frames = self.sock.recv_multipart(zmq.NOBLOCK)
                    return msgpack.unpackb(frames[0], raw=False)  # type: ignore[no-any-return]
                except zmq.Again:
                    await anyio.sleep(0.005)

    async def nothing(self, wait: float = 0.2) -> bool:
        await anyio.sleep(wait)
        return not self.sock.poll(0)

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


def header(**fields: Any) -> bytes:
    return msgpack.packb({"v": 1, **fields})  # type: ignore[no-any-return]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_each_kind_of_bad_input_is_answered_or_dropped() -> None:
    async with sl.Node(listen="tcp://127.0.0.1:0", max_frames=4,
                       max_header_size=4096) as node:
        c = await node.spawn(Counter, name="c")
        raw = RawClient(node.address)
        try:
            cases: list[tuple[list[bytes], str]] = [
                ([header(k="call", id=1, to=c.actor_id, m="nope", a=[], kw={})],
                 "MethodNotFound"),
                ([header(k="call", id=2, to=123456, m="incr", a=[], kw={})], "ActorNotFound"),
                ([header(k="frobnicate", id=3)], "ProtocolError"),
                ([msgpack.packb({"v": 2, "k": "hello", "id": 4})], "ProtocolError"),
                ([header(k="call", id=5, to=c.actor_id, m="incr",
                         a=[msgpack.ExtType(1, msgpack.packb(["<f4", [4], 3]))], kw={})],
                 "ProtocolError"),                                        # missing frame
                ([header(k="call", id=6, to=c.actor_id, m="incr",
                         a=[msgpack.ExtType(77, b"")], kw={})], "ProtocolError"),
                ([header(k="call", id=7, to=c.actor_id, m="incr", a=[], kw={}),
                  *[b"x"] * 5], "ProtocolError"),                           # too many frames
                ([header(k="call", id=8, to=c.actor_id, m="incr", a=["y" * 5000], kw={})],
                 "ProtocolError"),                                        # header too big
                ([header(k="call", id=9, to=c.actor_id, m=5, a={}, kw=[])], "ProtocolError"),
                ([header(k="spawn", id=10, cls="tests.actors_fixtures:Counter", a=[],
                         kw={}, opt={})], "Unauthorized"),
                ([header(k="call", id=11, to=c.actor_id, m="incr", a=["one"], kw={})],
                 "ActorError"),
            ]
            for frames, expected in cases:
                raw.send(frames)
                reply = await raw.recv()
                assert reply["k"] == "error", (frames, reply)
                assert reply["e"]["t"] == expected, (frames, reply)
            for junk in ([b"\xc1"], [msgpack.packb([1, 2])], [header(k="call")],
                         [b""], [header(k="call", id=True)]):
                raw.send(junk)
                assert await raw.nothing(), junk                 # dropped, not answered
            raw.send([header(k="call", id=99, to=c.actor_id, m="incr", a=[2], kw={})])
            assert (await raw.recv()) == {"v": 1, "k": "reply", "id": 99, "r": 2}
            raw.send([header(k="ping")])
            assert (await raw.recv())["k"] == "pong"
        finally:
            raw.close()
        assert await c.incr() == 3


@pytest.fixture(scope="module")
def fuzz_target() -> Iterator[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "shardline.cli", "node", "--allow", "tests",
         "--max-frame-size", "65536"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        yield line.split()[2]
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


ext = st.builds(msgpack.ExtType, st.integers(0, 5), st.binary(max_size=40))
leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(),
                 st.text(max_size=20), st.binary(max_size=20), ext)
values = st.recursive(leaf, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=5), inner, max_size=4), max_leaves=12)
near_valid = st.fixed_dictionaries(
    {"v": st.sampled_from([1, 1, 0, "1", None]),
     "k": st.sampled_from(["call", "tell", "spawn", "lookup", "stop", "watch", "hello",
                           "ping", "cancel", "reply", "?"]),
     "id": st.one_of(st.integers(-5, 2**64 - 1), values)},
    optional={"to": values, "m": values, "a": values, "kw": values, "cls": values,
              "name": values, "opt": values}).map(lambda d: msgpack.packb(d))
frames_strategy = st.lists(st.one_of(st.binary(max_size=200), near_valid), min_size=1,
                           max_size=6)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(batch=st.lists(frames_strategy, min_size=1, max_size=5))
def test_fuzzed_messages_never_take_the_node_down(fuzz_target: str,
                                                  batch: list[list[bytes]]) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 2000)  # closing waits until the batch is on the wire
    try:
        sock.connect(fuzz_target.partition(";")[0])
        for frames in batch:
            sock.send_multipart(frames)
    finally:
        sock.close()
        ctx.term()


def test_node_still_answers_after_the_fuzzing(fuzz_target: str) -> None:
    async def check() -> int:
        async with sl.Node() as node:
            worker = await node.connect(fuzz_target, timeout=10.0)
            c = await worker.spawn("tests.actors_fixtures:Counter", 41)
            return await c.incr()  # type: ignore[no-any-return]

    assert sl.run(check()) == 42


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def test_oversized_frames_are_refused_before_they_are_buffered() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "shardline.cli", "node", "--allow", "tests",
         "--max-frame-size", str(1 << 20)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().split()[2]
        async with sl.Node() as node:
            worker = await node.connect(address)
            c = await worker.spawn("tests.actors_fixtures:Counter")
            await c.incr()
            before = rss_kib(proc.pid)
            big = b"\x01" * (256 << 20)
            raw = RawClient(address)
            try:
                for _ in range(4):
                    raw.send([header(k="call", id=1, to=c.actor_id, m="incr", a=[], kw={}),
                              big])
                assert await raw.nothing(1.0)  # disconnected: no reply to the huge message
            finally:
                raw.close()
            del big
            grown = rss_kib(proc.pid) - before
            assert grown < (64 << 10), f"node grew by {grown} KiB"
            assert await c.incr() == 2     # and it still serves others
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
