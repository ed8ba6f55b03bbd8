"""Shared memory between processes of one host: real worker processes, real sockets,
``kill -9``, and what /proc says is left afterwards."""

from __future__ import annotations

import gc
import os
import signal

import anyio
import numpy as np
import pytest
import torch

import shardline as sl
from shardline.tensors import shared_empty
from shardline.transport._codec import Codec
from shardline.transport._exchange import exchange, size_class
from tests.shm_fixtures import in_segment, memfd_descriptors, memfd_mappings

pytestmark = pytest.mark.anyio

ALLOW = ["tests"]
MIB = 1 << 20


def _dev_shm() -> set[str]:
    return set(os.listdir("/dev/shm"))


def _own_segments_gone() -> bool:
    """No shardline segment is mapped or open in this process (after giving idle
    pooled ones back): the kernel has freed them unless another process holds one."""
    gc.collect()
    exchange().release_idle()
    return not memfd_mappings() and memfd_descriptors() == 0


def _lender_alive(pid: int) -> bool:
    """Whether process ``pid`` still exists as more than a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


async def _eventually(check: object, timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not check():  # type: ignore[operator]
            exchange().poll()
            await anyio.sleep(0.02)


async def test_large_tensor_arrives_as_a_view_of_a_segment() -> None:
    before = _dev_shm()
    async with sl.LocalCluster(1, allow=ALLOW) as cluster:
        holder = await cluster.nodes[0].spawn("tests.shm_fixtures:Holder")
        t = torch.randn(1 << 20)  # 4 MiB
        got = await holder.keep(t)
        assert got["in_segment"]
        assert got["sum"] == pytest.approx(float(t.double().sum()))
        (peer,) = cluster.node.peers()
        assert peer.shm is not None
        small = await holder.check(torch.ones(16))  # under the threshold: a TCP frame
        assert not small["in_segment"]

        # A reply goes back the same way: the caller's tensor maps the worker's segment.
        back = await holder.arange(1 << 20)
        assert in_segment(back)
        assert torch.equal(back, torch.arange(1 << 20, dtype=torch.float32))
        back += 1  # writable, and the worker's pool does not care
        del back
        assert _dev_shm() == before


async def test_segment_is_reused_once_the_receiver_drops_the_tensor() -> None:
    async with sl.LocalCluster(1, allow=ALLOW) as cluster:
        holder = await cluster.nodes[0].spawn("tests.shm_fixtures:Holder")
        ex = exchange()
        t = torch.randn(3 * MIB // 4)
        await holder.keep(t)
        (peer,) = cluster.node.peers()
        link = peer.shm
        assert link is not None
        assert len(link.lent) == 1  # the worker holds it
        (seg,) = link.lent
        await holder.drop()
        await _eventually(lambda: not link.lent)  # it said it let go
        await holder.check(torch.randn(3 * MIB // 4))  # same size class: the same segment
        await _eventually(lambda: not link.lent)
        assert seg in ex._segments
        # Given back to the kernel once idle: the worker unmaps it too.
        ex.release_idle()
        assert seg not in ex._segments
        with anyio.fail_after(10):
            while await holder.mappings():
                await anyio.sleep(0.05)


async def test_shared_empty_tensor_travels_without_a_copy() -> None:
    async with sl.LocalCluster(1, allow=ALLOW) as cluster:
        holder = await cluster.nodes[0].spawn("tests.shm_fixtures:Holder")
        t = shared_empty((2 * MIB // 4,), torch.float32)
        assert in_segment(t)
        t.fill_(1.0)
        # The worker writes into what it got: the very same memory, so it shows here.
        await holder.poke(t, 42.0)
        assert t[0].item() == 42.0
        got = await holder.check(t[MIB // 4:])  # a view inside the segment: still no copy
        assert got["in_segment"] and got["sum"] == MIB // 4
        before = len(memfd_mappings())
        del t
        gc.collect()
        exchange().poll()
        assert len(memfd_mappings()) == before - 1  # its segment went with the tensor


async def test_kill_9_of_the_receiver_leaves_nothing_behind() -> None:
    before = _dev_shm()
    async with sl.LocalCluster(1, allow=ALLOW) as cluster:
        holder = await cluster.nodes[0].spawn("tests.shm_fixtures:Holder")
        got = await holder.keep(torch.randn(2 * MIB))
        assert got["in_segment"]
        (peer,) = cluster.node.peers()
        link = peer.shm
        assert link is not None and link.lent
        (pid,) = cluster.pids()
        assert memfd_mappings(pid)
        os.kill(pid, signal.SIGKILL)
        # Its end of the connection closes with it: what it held is ours again.
        await _eventually(lambda: not link.alive and not link.lent)
    assert _dev_shm() == before
    assert _own_segments_gone()


async def test_kill_9_of_the_sender_keeps_the_view_valid_then_frees_it() -> None:
    before = _dev_shm()
    async with sl.LocalCluster(1, allow=ALLOW) as cluster:
        holder = await cluster.nodes[0].spawn("tests.shm_fixtures:Holder")
        t = await holder.arange(2 * MIB)  # the worker lends us its segment
        assert in_segment(t)
        (pid,) = cluster.pids()
        os.kill(pid, signal.SIGKILL)
        # Its end of the connection closes with it; our mapping stays.
        await _eventually(lambda: not _lender_alive(pid))
        # The sender is gone; the memory is not: the mapping keeps it.
        assert torch.equal(t, torch.arange(2 * MIB, dtype=torch.float32))
        del t
    assert _dev_shm() == before
    assert _own_segments_gone()


def test_codec_checks_shared_memory_descriptors() -> None:
    ex = exchange()
    info = ex.hello_info()
    assert info is not None
    link = ex.link_to(info)  # this process lends to itself: one codec on each side
    assert link is not None
    codec = Codec(max_frame_size=8 * MIB)
    arr = np.arange(MIB, dtype=np.float32)
    frames = codec.encode({"x": arr}, link=link)
    assert len(frames) == 1  # no bulk frame: it went to shared memory
    got = codec.decode(frames[0], frames[1:])["x"]
    assert np.array_equal(got, arr)

    small = Codec(max_frame_size=MIB)
    with pytest.raises(sl.ProtocolError, match="over the frame limit"):
        small.decode(frames[0], frames[1:])
    import msgpack

    for where, match in (([ex.proc, 10**12, 0, 64], "unknown here"),
                         ([ex.proc], r"\[process, segment, offset, nbytes\]"),
                         ([ex.proc, -1, 0, 4], r"\[process, segment, offset, nbytes\]")):
        header = msgpack.packb({"x": msgpack.ExtType(1, msgpack.packb(["<f4", [16], where]))})
        with pytest.raises(sl.ProtocolError, match=match):
            codec.decode(header, [])
    seg = frames.placed[0][1]
    overrun = msgpack.packb({"x": msgpack.ExtType(1, msgpack.packb(
        ["<f4", [MIB], [ex.proc, seg, 8, 4 * MIB]]))})
    with pytest.raises(sl.ProtocolError, match="overrun"):
        codec.decode(overrun, [])
    del got
    gc.collect()


def test_unsent_message_gives_its_segments_back() -> None:
    ex = exchange()
    info = ex.hello_info()
    link = ex.link_to(info)
    assert link is not None
    codec = Codec()
    frames = codec.encode({"x": torch.randn(MIB)}, link=link)
    assert len(link.lent) >= 1
    from shardline.transport._placement import discard

    lent = {ident for _, ident in frames.placed}
    assert lent <= link.lent
    discard(frames)
    assert not lent & link.lent


def test_no_shared_memory_when_off_or_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    ex = exchange()
    info = ex.hello_info()
    assert info is not None
    assert ex.link_to({**info, "host": "another-host"}) is None
    assert ex.link_to({**info, "proc": "x"}) is None
    assert ex.link_to("garbage") is None
    monkeypatch.setenv("SHARDLINE_SHM_MIN_BYTES", "off")
    codec = Codec()
    link = ex.link_to(info)
    frames = codec.encode({"x": np.zeros(MIB, dtype=np.uint8)}, link=link)
    assert len(frames) == 2  # a frame, not shared memory
    monkeypatch.setenv("SHARDLINE_SHM_MIN_BYTES", "bogus")
    with pytest.raises(ValueError, match="SHARDLINE_SHM_MIN_BYTES"):
        Codec()


def test_size_classes_waste_at_most_an_eighth() -> None:
    for n in (1, 4095, 4096, MIB, MIB + 1, 3 * MIB + 17, 64 * MIB, 64 * MIB + 1):
        size = size_class(n)
        assert size >= n and size % 4096 == 0
        assert size <= max(4096, n + n // 8 + 4096)
    assert size_class(64 * MIB) == 64 * MIB


async def test_every_dtype_through_shared_memory_bitwise() -> None:
    from tests.test_codec import ALL_TORCH_DTYPES, random_tensor

    async with sl.LocalCluster(1, allow=ALLOW) as cluster:
        holder = await cluster.nodes[0].spawn("tests.shm_fixtures:Holder")
        for dtype in ALL_TORCH_DTYPES:
            t = random_tensor(dtype, (512, 1024))
            if t.nbytes < MIB:
                t = random_tensor(dtype, (1024, 1024))
            back = await holder.echo(t)
            assert back.dtype == t.dtype and back.shape == t.shape
            assert torch.equal(back.view(torch.uint8), t.view(torch.uint8)), dtype
            assert in_segment(back)
        strided = torch.randn(2048, 1024).t()  # not contiguous: copied in one pass
        back = await holder.echo(strided)
        assert torch.equal(back, strided)


async def test_pipeline_device_links_go_through_shared_memory() -> None:
    from shardline.models import Pipeline
    from tests.test_pipeline import CE, spec

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1024, 512, generator=gen)  # 1 MiB per microbatch of 512 rows
    y = torch.randint(0, 4, (1024,), generator=gen)
    losses = {}
    async with sl.LocalCluster(2, allow=ALLOW) as cluster:
        probes = [await n.spawn("tests.shm_fixtures:Probe") for n in cluster.nodes]
        for where in ("processes", "here"):
            torch.manual_seed(0)
            placement = cluster.nodes if where == "processes" else ["cpu", "cpu"]
            pipe = await Pipeline.start(cluster.node, spec(n=4, dim=512), placement=placement,
                                        microbatches=2, loss_fn=CE,
                                        optimizer=("torch.optim.SGD", {"lr": 0.05}))
            try:
                losses[where] = [await pipe.train_step(x, y) for _ in range(3)]
            finally:
                await pipe.stop()
        # activations went to the second worker, gradients back to the first, each
        # through segments the other lent it
        for probe in probes:
            assert (await probe.statistics())["received"] >= 1
    assert losses["processes"] == losses["here"]  # bit for bit


def test_a_forked_child_does_not_keep_segments_or_connections() -> None:
    ex = exchange()
    info = ex.hello_info()
    link = ex.link_to(info)
    assert link is not None
    codec = Codec()
    frames = codec.encode({"x": np.ones(MIB, dtype=np.uint8)}, link=link)
    fds_here = memfd_descriptors()
    assert fds_here >= 1
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its memfd descriptors, then leave at once
        try:
            os.write(w, str(memfd_descriptors()).encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        assert os.read(r, 64) == b"0"
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    got = codec.decode(frames[0], frames[1:])["x"]
    assert got.sum() == MIB  # the parent's exchange is untouched
