"""CUDA tensors by IPC handle: the descriptor, the keep-alive and its acknowledgement
(no GPU needed), and the real thing between two processes (skipped without CUDA)."""

from __future__ import annotations

import gc
import os
import signal
import weakref

import anyio
import msgpack
import pytest
import torch

import shardline as sl
from shardline._cuda_ipc import CudaDescriptor, share
from shardline.transport._codec import EXT_CUDA, Codec
from shardline.transport._exchange import exchange

pytestmark = pytest.mark.anyio

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class Kept:
    """Something a sender keeps alive for a receiver (a CUDA storage, in real use)."""


def descriptor(**changes: object) -> CudaDescriptor:
    fields: dict[str, object] = {
        "dtype": "float32", "shape": [4, 8], "stride": [8, 1], "offset": 2, "device": 0,
        "handle": b"\x01" * 64, "size_bytes": 4 * 40, "offset_bytes": 512,
        "ref_counter_handle": b"/torch_123_456", "ref_counter_offset": 3,
        "event_handle": b"\x02" * 64, "event_sync_required": True, "proc": 7, "token": 9}
    fields.update(changes)
    return CudaDescriptor(**fields)  # type: ignore[arg-type]


def test_descriptor_roundtrips() -> None:
    desc = descriptor()
    assert CudaDescriptor.unpack(desc.pack()) == desc
    empty = descriptor(shape=[0, 8], size_bytes=0)
    assert CudaDescriptor.unpack(empty.pack()) == empty


@pytest.mark.parametrize("fields,match", [
    ([1, 2, 3], "14 fields"),
    ([*list(descriptor().__dict__.values())[:13], "x"], "uints"),
    ({**descriptor().__dict__, "shape": [4, -8]}, "non-negative"),
    ({**descriptor().__dict__, "stride": [8]}, "one length"),
    ({**descriptor().__dict__, "handle": "text"}, "binary"),
    ({**descriptor().__dict__, "event_sync_required": 1}, "bool"),
    ({**descriptor().__dict__, "size_bytes": 4 * 30}, "overruns"),
    ({**descriptor().__dict__, "dtype": "float99"}, "unknown torch dtype"),
])
def test_bad_descriptors_are_protocol_errors(fields: object, match: str) -> None:
    values = list(fields.values()) if isinstance(fields, dict) else fields
    with pytest.raises(sl.ProtocolError, match=match):
        CudaDescriptor.unpack(msgpack.packb(values))


def self_link() -> object:
    ex = exchange()
    info = ex.hello_info()
    assert info is not None
    link = ex.link_to(info)
    assert link is not None
    return link


async def _released(ref: weakref.ref[Kept]) -> None:
    with anyio.fail_after(10):
        while ref() is not None:
            exchange().poll()
            gc.collect()
            await anyio.sleep(0.01)


def kept_by_self_link() -> tuple[weakref.ref[Kept], int]:
    """Something this process keeps for itself (its own receiver), and the token."""
    obj = Kept()
    return weakref.ref(obj), exchange().keep(self_link(), obj)  # type: ignore[arg-type]


async def test_the_sender_keeps_it_until_the_receiver_acknowledges() -> None:
    ex = exchange()
    ref, token = kept_by_self_link()
    gc.collect()
    ex.poll()
    assert ref() is not None  # nothing said yet
    ex.acknowledge(ex.proc, token + 1000)  # a token it never had: nothing happens
    ex.poll()
    assert ref() is not None
    ex.acknowledge(ex.proc, token)
    await _released(ref)


async def test_a_descriptor_this_process_cannot_open_is_still_acknowledged() -> None:
    if torch.cuda.is_available():
        pytest.skip("this process can open CUDA handles")
    ex = exchange()
    ref, token = kept_by_self_link()
    payload = descriptor(proc=ex.proc, token=token).pack()
    header = msgpack.packb({"t": msgpack.ExtType(EXT_CUDA, payload)})
    with pytest.raises(sl.ProtocolError, match="no CUDA"):
        Codec().decode(header, [])
    await _released(ref)


def test_no_ipc_unless_the_peer_sees_the_same_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    from shardline.transport._placement import Buffers

    link = self_link()
    t = torch.zeros(4)  # never touched: the checks come first
    buffers = Buffers(link, 1)  # type: ignore[arg-type]
    assert share(t, []) is None  # no link: another host
    monkeypatch.setattr(link, "gpus", "0,1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    assert share(t, buffers) is None
    monkeypatch.setattr(link, "gpus", "1,0")
    monkeypatch.setenv("SHARDLINE_CUDA_IPC", "0")
    assert share(t, buffers) is None
    monkeypatch.setattr(link, "confirmed", False)
    monkeypatch.setenv("SHARDLINE_CUDA_IPC", "1")
    assert share(t, buffers) is None


class Acknowledger(sl.Actor):
    """Plays the receiver: acknowledges a token on the sender's connection."""

    def acknowledge(self, proc: int, token: int) -> None:
        exchange().acknowledge(proc, token)


async def test_keep_alive_across_processes_and_after_a_kill() -> None:
    ex = exchange()
    async with sl.LocalCluster(1, allow=["tests"]) as cluster:
        worker = await cluster.nodes[0].spawn("tests.test_cuda_ipc:Acknowledger")
        await worker.acknowledge(0, 0)  # connects, learns its shared memory
        (peer,) = cluster.node.peers()
        link = peer.shm
        assert link is not None and link.confirmed
        first, second = Kept(), Kept()
        refs = [weakref.ref(first), weakref.ref(second)]
        tokens = [ex.keep(link, first), ex.keep(link, second)]
        del first, second
        await worker.acknowledge(ex.proc, tokens[0])
        await _released(refs[0])
        assert refs[1]() is not None
        (pid,) = cluster.pids()
        os.kill(pid, signal.SIGKILL)
        await _released(refs[1])  # its process died: nobody will acknowledge


@needs_cuda
async def test_cuda_tensor_arrives_by_handle_in_another_process() -> None:
    async with sl.LocalCluster(1, allow=["tests"]) as cluster:
        holder = await cluster.nodes[0].spawn("tests.shm_fixtures:Holder")
        t = torch.arange(1 << 20, dtype=torch.float32, device="cuda:0")
        got = await holder.on_gpu(t)
        assert got == {"device": "cuda:0", "sum": float(t.double().sum())}
        back = await holder.gpu_arange(1 << 20)  # and the other way
        assert back.device == torch.device("cuda:0")
        assert torch.equal(back, t)
