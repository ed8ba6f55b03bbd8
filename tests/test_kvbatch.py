"""``_kvbatch.append_rows``: each request's keys and values in batch tensors with room
to grow; a running batch appends in place, any other batch copies."""

from __future__ import annotations

from typing import Any

import torch

from shardline.models._kvbatch import append_rows, history, spare

HEADS, DIM = 2, 4


class Reference:
    """Each request's keys and values, one tensor per request, by plain concatenation."""

    def __init__(self, n: int) -> None:
        self.keys: list[torch.Tensor] = [torch.zeros(HEADS, 0, DIM) for _ in range(n)]
        self.values: list[torch.Tensor] = [torch.zeros(HEADS, 0, DIM) for _ in range(n)]

    def append(self, which: list[int], keys: torch.Tensor, values: torch.Tensor,
               lengths: list[int] | None) -> None:
        for row, i in enumerate(which):
            n = keys.shape[2] if lengths is None else lengths[row]
            self.keys[i] = torch.cat([self.keys[i], keys[row, :, :n]], dim=1)
            self.values[i] = torch.cat([self.values[i], values[row, :, :n]], dim=1)


def step(states: list[dict[str, Any]], ref: Reference, which: list[int], t: int,
         gen: torch.Generator, lengths: list[int] | None = None
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """One call over requests ``which``; checks what it returns against the reference."""
    keys = torch.randn(len(which), HEADS, t, DIM, generator=gen)
    values = torch.randn(len(which), HEADS, t, DIM, generator=gen)
    past = [int(states[i].get("len", 0)) for i in which]
    all_keys, all_values = append_rows([states[i] for i in which], keys, values, lengths)
    ref.append(which, keys, values, lengths)
    assert all_keys.shape == (len(which), HEADS, max(past) + t, DIM)
    for row, i in enumerate(which):
        n = ref.keys[i].shape[1]
        assert states[i]["len"] == n
        assert torch.equal(all_keys[row, :, :n], ref.keys[i])
        assert torch.equal(all_values[row, :, :n], ref.values[i])
        seen = history(states[i])
        assert seen is not None and torch.equal(seen[0][0], ref.keys[i])
    # what lies past a row's own positions enters the (masked) arithmetic: finite
    assert torch.isfinite(all_keys).all() and torch.isfinite(all_values).all()
    return all_keys, all_values


def test_a_running_batch_appends_in_place_step_after_step() -> None:
    gen = torch.Generator().manual_seed(0)
    states: list[dict[str, Any]] = [{} for _ in range(3)]
    ref = Reference(3)
    step(states, ref, [0, 1, 2], 5, gen, lengths=[2, 5, 3])  # a ragged prefill
    held = states[0]["k"]
    assert held.shape[2] == 5 + spare(5)  # room for the steps to come
    for _ in range(spare(5)):  # decode steps, until the room is used up
        keys, _ = step(states, ref, [0, 1, 2], 1, gen)
        assert all(s["k"] is held for s in states)
        assert keys.data_ptr() == held.data_ptr()  # a view, not a copy
    step(states, ref, [0, 1, 2], 1, gen)  # full: one copy into larger tensors
    assert states[0]["k"] is not held
    assert states[0]["k"].shape[2] > held.shape[2]
    assert all(s["k"] is states[0]["k"] for s in states)


def test_rows_that_change_copy_and_leave_the_others_whole() -> None:
    gen = torch.Generator().manual_seed(1)
    states: list[dict[str, Any]] = [{} for _ in range(4)]
    ref = Reference(4)
    step(states, ref, [0, 1, 2], 3, gen)
    step(states, ref, [0, 1, 2], 1, gen)
    shared = states[0]["k"]
    before = shared.clone()
    # request 1 leaves, request 3 joins: a new batch, copied
    step(states, ref, [3], 2, gen)
    step(states, ref, [0, 2, 3], 1, gen)
    assert states[0]["k"] is not shared and states[1]["k"] is shared
    # nothing wrote into the tensors the request that left still points into
    assert torch.equal(shared, before)
    # the same rows in another order: a copy again, every row still its own
    step(states, ref, [3, 0, 2], 1, gen)
    step(states, ref, [1], 1, gen)


def test_a_state_restored_after_a_failed_call_is_whole() -> None:
    """``run_rows`` puts back shallow copies of the states when a batched call raises:
    the in-place writes of the failed call lie past every row's own positions."""
    gen = torch.Generator().manual_seed(2)
    states: list[dict[str, Any]] = [{} for _ in range(2)]
    ref = Reference(2)
    step(states, ref, [0, 1], 4, gen, lengths=[4, 2])
    step(states, ref, [0, 1], 1, gen)
    saved = [dict(s) for s in states]
    append_rows(states, torch.full((2, HEADS, 1, DIM), 7.0),
                torch.full((2, HEADS, 1, DIM), 7.0))  # the call that "failed"
    for state, kept in zip(states, saved, strict=True):
        state.clear()
        state.update(kept)
    step(states, ref, [0, 1], 1, gen)
    step(states, ref, [0, 1], 1, gen)

