"""Slurm's compressed host lists: ``node[01-04,07],login1`` -> node01 ... node07, login1.

What ``scontrol show hostnames`` prints, without shelling out: brackets hold ranges
(zero padding kept) and single numbers; a name may have several bracket groups
(``rack[1-2]-n[1-3]``, their product); items are separated by commas outside brackets.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

__all__ = ["expand", "first_host"]

_GROUP = re.compile(r"\[([^\[\]]*)\]")


def _items(text: str) -> Iterator[str]:
    depth, start = 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in host list {text!r}")
        elif ch == "," and depth == 0:
            yield text[start:i]
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced '[' in host list {text!r}")
    yield text[start:]


def _numbers(spec: str, text: str) -> list[str]:
    out: list[str] = []
    for part in spec.split(","):
        low, dash, high = part.strip().partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise ValueError(f"bad range {part!r} in host list {text!r}")
        if not dash:
            out.append(low)
            continue
        width = len(low) if low.startswith("0") else 0
        first, last = int(low), int(high)
        if last < first:
            raise ValueError(f"descending range {part!r} in host list {text!r}")
        out += [str(i).zfill(width) for i in range(first, last + 1)]
    return out


def _expand_item(item: str, text: str) -> Iterator[str]:
    match = _GROUP.search(item)
    if match is None:
        yield item
        return
    head, tail = item[:match.start()], item[match.end():]
    for number in _numbers(match.group(1), text):
        for rest in _expand_item(tail, text):
            yield head + number + rest


def expand(text: str) -> list[str]:
    """Every host named by ``text``, in order."""
    return [host for item in _items(text.strip()) if item
            for host in _expand_item(item, text)]


def first_host(text: str) -> str | None:
    for item in _items(text.strip()):
        if item:
            return next(_expand_item(item, text))
    return None
