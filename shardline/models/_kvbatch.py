"""Attention over many requests at once, each row of the batch continuing its own
sequence (continuous batching).

Every request keeps its keys and values in its own state dict, so requests can join
and leave the batch between steps: ``state["k"]`` / ``state["v"]`` (``[batch, heads,
width, head_dim]``), of which the request's are row ``state["row"]``, its first
``state["len"]`` positions (``history``). A batched call right-pads the rows' histories
to the longest one, appends each row's new keys right after its own history, and masks
the padding out of the attention. The padding is the price of one attention call for
the whole batch instead of one per row; with decode steps (one new token per row) it is
a copy of each row's history, which costs far less than the per-row calls it saves.

The rows of a prefill call bring different numbers of new tokens (``lengths``): their
input is right-padded to the longest too. A padding token's key lies after every real
query of its row, so causality hides it; it is not kept in the row's state, and its
own output is garbage nobody reads (the head takes each row's last real position).

Every row's state then points into the padded batch tensors of the call (no copy per
row). Those tensors have room for more positions than the call needs (``spare``), so
the next step over the same requests, in the same order (a running decode batch, step
after step), writes its new keys into them in place: no copy of any history. A step
whose rows differ (a request joined or left) copies all their histories at once, into
new tensors with room again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["append_rows", "history", "keep", "last_positions", "new_lengths",
           "past_lengths", "row_mask", "row_positions", "spare"]


def past_lengths(states: Sequence[dict[str, Any]]) -> list[int]:
    """Tokens each row's state already holds keys for."""
    return [int(s.get("len", 0)) for s in states]


def history(state: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One request's keys and values so far, ``[1, heads, seen, head_dim]`` (views), or
    ``None`` before its first token."""
    n = int(state.get("len", 0))
    if not n:
        return None
    row = int(state["row"])
    return state["k"][row:row + 1, :, :n], state["v"][row:row + 1, :, :n]


def keep(state: dict[str, Any], keys: torch.Tensor, values: torch.Tensor) -> None:
    """One request's keys and values (``[1, heads, seen, head_dim]``) become its state."""
    state.update(k=keys, v=values, row=0, len=int(keys.shape[2]))


def new_lengths(lengths: Sequence[int] | None, rows: int, t: int) -> list[int]:
    """How many of each row's ``t`` new tokens are real (``None``: all of them)."""
    if lengths is None:
        return [t] * rows
    if len(lengths) != rows or not all(1 <= n <= t for n in lengths):
        raise ValueError(f"lengths must give 1..{t} new tokens for each of {rows} rows, "
                         f"got {list(lengths)}")
    return [int(n) for n in lengths]


def append_rows(states: Sequence[dict[str, Any]], keys: torch.Tensor,
                values: torch.Tensor,
                lengths: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Append the new ``keys`` / ``values`` (``[rows, heads, t, head_dim]``) of each row to
    its state (only its first ``lengths[i]``: the rest is padding); returns every row's
    keys and values, right-padded to ``[rows, heads, longest + t, head_dim]`` (views of
    the tensors the states hold).

    What lies past a row's own positions is masked out (``row_mask``) but still enters
    the arithmetic: it is zeros or keys of real (padding) tokens, never uninitialized
    memory, since NaN times a zero weight is NaN. Writing in place only ever writes past
    a row's own positions, so a state restored to a shallow copy taken before the call
    (``_rows.run_rows`` after a failure) is still whole."""
    rows, heads, t, dim = keys.shape
    past = past_lengths(states)
    new = new_lengths(lengths, rows, t)
    width = max(past) + t
    held = _in_place(states, width)
    if held is not None:
        all_keys, all_values = held
    else:
        room = width + spare(width)
        all_keys = keys.new_zeros(rows, heads, room, dim)
        all_values = values.new_zeros(rows, heads, room, dim)
        _copy_histories(states, past, all_keys, all_values)
    if min(past) == max(past):
        n = past[0]
        all_keys[:, :, n:n + t] = keys
        all_values[:, :, n:n + t] = values
    else:
        where = row_positions(past, t, keys.device)                # [rows, t]
        which = torch.arange(rows, device=keys.device)[:, None].expand(rows, t)
        all_keys[which, :, where] = keys.transpose(1, 2)           # [rows, t, heads, dim]
        all_values[which, :, where] = values.transpose(1, 2)
    for i, (state, n, m) in enumerate(zip(states, past, new, strict=True)):
        state.update(k=all_keys, v=all_values, row=i, len=n + m)
    return all_keys[:, :, :width], all_values[:, :, :width]


def spare(width: int) -> int:
    """Positions a new batch tensor keeps free past ``width``: the next steps of its rows
    write there in place, and the copy into a larger one when it is full is paid once
    per half its size again."""
    return max(32, width // 2)


def _in_place(states: Sequence[dict[str, Any]],
              width: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The batch tensors every row continues in place, when row ``i`` of the call is row
    ``i`` of the same tensors, which hold no other rows and have room for ``width``
    positions; else ``None``."""
    first = states[0]
    keys: torch.Tensor | None = first.get("k")
    if keys is None or keys.shape[0] != len(states) or keys.shape[2] < width:
        return None
    if any(s.get("k") is not keys or s.get("row") != i for i, s in enumerate(states)):
        return None
    values: torch.Tensor = first["v"]
    return keys, values


def _copy_histories(states: Sequence[dict[str, Any]], past: list[int],
                    all_keys: torch.Tensor, all_values: torch.Tensor) -> None:
    """Each row's history into row ``i`` of the new batch tensors, one copy per batch
    tensor the histories come from: requests that were in the last step together need
    no copy of their own."""
    rows = len(states)
    sources: dict[int, tuple[dict[str, Any], list[int], list[int]]] = {}
    for i, (state, n) in enumerate(zip(states, past, strict=True)):
        if n:
            _, into, taken = sources.setdefault(id(state["k"]), (state, [], []))
            into.append(i)
            taken.append(int(state["row"]))
    for first, into, taken in sources.values():
        span = min(int(first["k"].shape[2]), max(past[i] for i in into))
        if into == taken == list(range(rows)) and first["k"].shape[0] == rows:
            all_keys[:, :, :span] = first["k"][:, :, :span]
            all_values[:, :, :span] = first["v"][:, :, :span]
        else:
            to = torch.tensor(into, device=all_keys.device)
            of = torch.tensor(taken, device=all_keys.device)
            all_keys[to, :, :span] = first["k"][of, :, :span]
            all_values[to, :, :span] = first["v"][of, :, :span]


def row_positions(past: Sequence[int], t: int, device: torch.device) -> torch.Tensor:
    """Positions ``[rows, t]`` of each row's ``t`` new tokens (after its own history)."""
    start = torch.tensor(list(past), dtype=torch.int64, device=device)
    return start[:, None] + torch.arange(t, device=device)[None, :]


def row_mask(past: Sequence[int], t: int, window: int | None,
             device: torch.device) -> torch.Tensor | None:
    """Which keys of the padded batch (``append_rows``) each new query sees, as a boolean
    ``[rows, 1, t, longest + t]`` mask: its own row's history and the new tokens up to
    itself, within ``window`` tokens when there is one. ``None`` where every key is
    visible to every query (one new token per row, all rows equally long, no window in
    reach), which lets the attention kernel skip the mask."""
    longest = max(past)
    width = longest + t
    windowed = window is not None and width > window
    if t == 1 and not windowed and min(past) == longest:
        return None
    query = row_positions(past, t, device)[:, None, :, None]  # [rows, 1, t, 1]
    key = torch.arange(width, device=device)[None, None, None, :]
    keep = key <= query  # the padding lies after the row's last position: masked too
    if window is not None:
        keep &= query - key < window  # transformers' sliding window: the last `window`
    return keep


def last_positions(x: torch.Tensor, lengths: Sequence[int] | None) -> torch.Tensor:
    """Each row's last real position of ``x`` (``[rows, t, ...]``), as ``[rows, 1, ...]``."""
    if lengths is None:
        return x[:, -1:]
    index = torch.tensor([n - 1 for n in lengths], dtype=torch.int64, device=x.device)
    return x[torch.arange(x.shape[0], device=x.device), index].unsqueeze(1)
