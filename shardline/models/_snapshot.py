"""In-memory snapshots of stage state, held on another node (Gemini, SOSP'23).

A snapshot is the stage's parameters, buffers and optimizer state as CPU tensors under
the unsharded model's names, tagged with the number of training steps it follows. Each
stage keeps its recent versions itself, for a rollback that needs no network, and pushes
each one to a ``SnapshotHolder`` on another node, so the state outlives the stage's
node. Both keep two versions: a version counts as taken only once every stage's copy of
it reached its holder, and until then the previous one must stay restorable.

A stage captures into one shared-memory segment (``in_shared_memory``), so a holder on
the same host maps the snapshot instead of receiving a copy of it, and the snapshot
outlives the stage's process as long as the holder maps it.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .. import Actor
from ..tensors import dtype_by_name, shared_empty

__all__ = ["SnapshotHolder", "Versions", "in_shared_memory", "pack", "unpack"]

State = dict[str, Any]


class Versions:
    """The latest ``keep`` versions of one stage's state, oldest dropped first.

    A dropped version this stage captured itself is kept as the buffers of the next
    capture: allocating (and first touching) megabytes on every step costs more than
    the copy. By the time a version is dropped, its push to the holder was acknowledged,
    so nothing is still sending from those buffers.
    """

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self._by_version: dict[int, State] = {}
        self._spare: State | None = None

    def put(self, version: int, state: State) -> None:
        self._by_version[version] = state
        for old in sorted(self._by_version)[:-self.keep]:
            self._drop(old)

    def _drop(self, version: int) -> None:
        state = self._by_version.pop(version)
        if state.get("owned"):
            self._spare = state

    def spare(self) -> State | None:
        """Buffers of a dropped version to capture into (taken: one user at a time)."""
        state, self._spare = self._spare, None
        return state

    def get(self, version: int) -> State:
        try:
            return self._by_version[version]
        except KeyError:
            raise LookupError(f"no snapshot of version {version} (have "
                              f"{sorted(self._by_version) or 'none'})") from None

    def versions(self) -> list[int]:
        return sorted(self._by_version)

    def drop_below(self, version: int) -> None:
        for old in [v for v in self._by_version if v < version]:
            self._drop(old)

    def nbytes(self) -> int:
        return sum(_nbytes(state) for state in self._by_version.values())


class SnapshotHolder(Actor):
    """Keeps other stages' snapshots in this node's memory (one per pipeline and node)."""

    max_concurrency = 64  # puts from several stages arrive together

    def __init__(self, keep: int = 2) -> None:
        self._keep = keep
        self._stages: dict[str, Versions] = {}

    def put(self, key: str, version: int, state: State) -> int:
        """Store ``state`` as ``version`` of stage ``key``; returns the version."""
        # Never reused as capture buffers here: it may map the stage's own memory.
        state = {**state, "owned": False}
        self._stages.setdefault(key, Versions(self._keep)).put(version, state)
        return version

    def get(self, key: str, version: int) -> State:
        versions = self._stages.get(key)
        if versions is None:
            raise LookupError(f"this node holds no snapshot of {key}")
        return versions.get(version)

    def versions(self, key: str) -> list[int]:
        versions = self._stages.get(key)
        return [] if versions is None else versions.versions()

    def forget(self, key: str) -> None:
        self._stages.pop(key, None)

    def nbytes(self) -> int:
        return sum(v.nbytes() for v in self._stages.values())


_ALIGN = 64  # what CPU kernels expect of their inputs (see _stage._aligned)


def in_shared_memory(state: State) -> State:
    """``state`` (model and optimizer tensors) copied into one shared-memory segment,
    each tensor a 64-byte aligned view of it; everything else as it is.

    One segment rather than one per tensor: it travels as one tensor (``pack``), which a
    process on this host maps instead of receiving hundreds of frames, and later
    captures copy into the same views (``Versions.spare``). ``segment`` names it."""
    tensors = [t for part in ("model", "opt") for t in _tensors(state[part]).values()]
    offsets, total = [], 0
    for t in tensors:
        offsets.append(total)
        total += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
    arena = shared_empty(max(total, 1), torch.uint8)
    where = {id(t): offset for t, offset in zip(tensors, offsets, strict=True)}
    layout = [[part, key, str(t.dtype).removeprefix("torch."), list(t.shape), where[id(t)]]
              for part in ("model", "opt") for key, t in _tensors(state[part]).items()]
    out = unpack({"arena": arena, "layout": layout, "groups": state["opt"]["groups"]})
    for part in ("model", "opt"):
        for key, t in _tensors(state[part]).items():
            _tensors(out[part])[key].copy_(t)
    out.update({k: v for k, v in state.items() if k not in ("model", "opt")})
    out["segment"] = [arena, layout]
    return out


def pack(state: State) -> State:
    """``state`` as it travels: one segment and where each tensor lies in it, when it
    was captured into one (a message with one tensor, not hundreds: each costs its
    encoding and decoding on busy processes); otherwise as it is."""
    segment = state.get("segment")
    if segment is None:
        return state
    packed = {k: v for k, v in state.items() if k not in ("model", "opt", "segment")}
    packed.update({"arena": segment[0], "layout": segment[1],
                   "groups": state["opt"]["groups"]})
    return packed


def unpack(state: State) -> State:
    """The tensors of a ``pack``ed state as views of its segment (a state that was not
    packed as it is)."""
    if "layout" not in state:
        return state
    arena: torch.Tensor = state["arena"]
    out: State = {k: v for k, v in state.items() if k not in ("arena", "layout", "groups")}
    out["model"] = {}
    out["opt"] = {"tensors": {}, "groups": state["groups"]}
    for part, key, dtype, shape, offset in state["layout"]:
        dt = dtype_by_name(dtype)
        nbytes = math.prod(shape) * dt.itemsize
        view = arena[offset:offset + nbytes].view(dt).view(shape)
        _tensors(out[part])[key] = view
    return out


def _tensors(part: dict[str, Any]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = part.get("tensors", part)
    return tensors


def _nbytes(value: Any) -> int:
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0
