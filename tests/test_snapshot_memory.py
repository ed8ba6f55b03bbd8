"""Snapshots are captured into one shared-memory segment (``in_shared_memory``)."""

from __future__ import annotations

import anyio
import pytest
import torch

import shardline as sl
from shardline.models import LayerSpec, Pipeline, PipelineError
from shardline.models._snapshot import SnapshotHolder, in_shared_memory, pack, unpack
from tests.shm_fixtures import in_segment


def test_state_lands_in_one_segment_aligned_and_equal() -> None:
    model = {"w": torch.randn(3, 5), "b": torch.randn(5), "n": torch.tensor(7)}
    opt = {"tensors": {"w::exp_avg": torch.randn(3, 5).double(),
                       "w::step": torch.tensor(3.0)},
           "groups": [{"lr": 0.1}]}
    state = in_shared_memory({"model": model, "opt": opt, "version": 4})
    assert state["version"] == 4 and state["opt"]["groups"] == [{"lr": 0.1}]
    got = [*state["model"].values(), *state["opt"]["tensors"].values()]
    want = [*model.values(), *opt["tensors"].values()]
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and torch.equal(g, w)
        assert g.data_ptr() % 64 == 0 and in_segment(g)
        assert g.data_ptr() != w.data_ptr()
    starts = sorted(t.untyped_storage().data_ptr() for t in got)
    assert starts[0] == starts[-1]  # every tensor views the same segment


def test_a_holder_never_reuses_what_it_was_sent() -> None:
    holder = SnapshotHolder(keep=1)
    state = {"model": {"w": torch.zeros(2)}, "opt": {"tensors": {}, "groups": []},
             "owned": True}
    holder.put("s0", 1, state)
    holder.put("s0", 2, state)  # drops version 1: it must not become capture buffers
    assert holder._stages["s0"].spare() is None
    assert holder.get("s0", 2)["owned"] is False


def test_a_packed_state_is_one_tensor_and_unpacks_to_the_same_views() -> None:
    model = {"w": torch.randn(4, 3), "b": torch.randn(3).half()}
    opt = {"tensors": {"w::exp_avg": torch.randn(4, 3)}, "groups": [{"lr": 0.5}]}
    state = in_shared_memory({"model": model, "opt": opt, "version": 2, "owned": True})
    packed = pack(state)
    tensors = [v for v in packed.values() if isinstance(v, torch.Tensor)]
    assert len(tensors) == 1 and packed["version"] == 2 and packed["owned"] is True
    back = unpack(packed)
    assert back["opt"]["groups"] == [{"lr": 0.5}] and back["version"] == 2
    for part, want in (("model", model), ("opt", opt["tensors"])):
        got = back[part] if part == "model" else back["opt"]["tensors"]
        assert got.keys() == want.keys()
        for k, t in want.items():
            assert got[k].dtype == t.dtype and torch.equal(got[k], t)
            assert got[k].data_ptr() == (state[part] if part == "model"
                                         else state["opt"]["tensors"])[k].data_ptr()
    plain = {"model": {"w": torch.ones(1)}, "opt": {"tensors": {}, "groups": []}}
    assert pack(plain) is plain and unpack(plain) is plain


@pytest.mark.anyio
@pytest.mark.timeout(120)
async def test_every_capture_after_the_optimizer_state_appears_is_one_segment() -> None:
    """Snapshot 0 is taken before the optimizer has state; the capture that reuses its
    buffers must still land in one segment (it once fell back to loose tensors, and
    every later capture of that chain with it: each push then sent ~100 tensors)."""
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, 8, generator=gen), torch.randint(0, 4, (8,), generator=gen)
    async with sl.LocalCluster(3, allow=["tests"]) as cluster:
        pipe = await Pipeline.start(
            cluster.node, LayerSpec("tests.models_fixtures:layers", {"n": 4}, 4),
            placement=cluster.nodes[:2], spares=cluster.nodes[2:], snapshot_every=1,
            microbatches=2, loss_fn="torch.nn.functional:cross_entropy",
            optimizer=("torch.optim.AdamW", {"lr": 0.01}))
        try:
            seen = []
            for _ in range(5):
                await pipe.train_step(x, y)
                for ref in pipe.fleet.refs.values():
                    newest = (await ref.snapshots())[-1]
                    state = await ref.snapshot_state(newest)
                    seen.append(newest)
                    assert "arena" in state and "model" not in state, newest
            assert sorted(set(seen)) == [1, 2, 3, 4, 5]
        finally:
            await pipe.stop()


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_a_commit_that_fails_before_its_snapshot_leaves_no_reader_waiting() -> None:
    """The snapshot is taken after the optimizer step, deferred to the next bubble; a
    step whose optimizer raised takes none, and readers of the snapshots must not wait
    for it (they once waited forever)."""
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(8, 8, generator=gen), torch.randint(0, 4, (8,), generator=gen)
    async with sl.Node(allow=["tests"]) as node:
        pipe = await Pipeline.start(
            node, LayerSpec("tests.models_fixtures:layers", {"n": 4}, 4), stages=2,
            snapshot_every=1, microbatches=2, loss_fn="torch.nn.functional:cross_entropy",
            optimizer=("tests.models_fixtures:SGDFailingAtStep",
                       {"lr": 0.1, "fail_at": 2}))
        try:
            await pipe.train_step(x, y)
            with pytest.raises(PipelineError, match="failed on purpose"):
                await pipe.train_step(x, y)
            with anyio.fail_after(10):
                for ref in pipe.fleet.refs.values():
                    assert (await ref.snapshots())[-1] == 1
                    assert "arena" in await ref.snapshot_state(1)
        finally:
            await pipe.stop()
