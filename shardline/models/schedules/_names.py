"""Schedules by name, as ``Pipeline.start(schedule=...)`` and the CLI take them."""

from __future__ import annotations

from collections.abc import Callable

from ._dualpipe import dualpipe_v
from ._gpipe import gpipe
from ._interleaved import interleaved_1f1b
from ._one_f_one_b import one_f_one_b
from ._schedule import Schedule
from ._zero_bubble import zb_h1, zbv

__all__ = ["NAMES", "by_name"]

_BUILDERS: dict[str, Callable[[int, int, int], Schedule]] = {
    "gpipe": lambda p, m, v: gpipe(p, m),
    "1f1b": lambda p, m, v: one_f_one_b(p, m),
    "interleaved-1f1b": interleaved_1f1b,
    "zb-h1": lambda p, m, v: zb_h1(p, m),
    "zbv": lambda p, m, v: zbv(p, m),
    "dualpipev": lambda p, m, v: dualpipe_v(p, m),
}
NAMES: tuple[str, ...] = tuple(_BUILDERS)
"""The canonical names, each the ``name`` of the schedule it builds."""

_ALIASES = {
    "one-f-one-b": "1f1b",
    "interleaved": "interleaved-1f1b",
    "zbh1": "zb-h1",
    "zb1p": "zb-h1",
    "zb-v": "zbv",
    "dualpipe-v": "dualpipev",
}


def by_name(name: str, stages: int, microbatches: int, chunks: int = 2) -> Schedule:
    """``"gpipe"`` | ``"1f1b"`` | ``"interleaved-1f1b"`` | ``"zb-h1"`` | ``"zbv"`` |
    ``"dualpipev"`` -> the schedule for ``stages`` devices (case and ``_``/``-`` do not
    matter; ``"zb1p"``, ``"dualpipe-v"`` and the like are understood too). ``chunks``
    only matters to interleaved 1F1B; ``zbv`` and ``dualpipev`` always have 2 stages
    per device."""
    key = name.lower().replace("_", "-")
    builder = _BUILDERS.get(_ALIASES.get(key, key))
    if builder is None:
        raise ValueError(f"unknown schedule {name!r}: use one of {', '.join(NAMES)}")
    return builder(stages, microbatches, chunks)
