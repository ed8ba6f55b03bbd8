"""Snapshots are captured into one shared-memory segment (``in_shared_memory``)."""

from __future__ import annotations

import torch

from shardline.models._snapshot import SnapshotHolder, in_shared_memory
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
