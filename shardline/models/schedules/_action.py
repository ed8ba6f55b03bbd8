"""One step of a device's program: run one kind of computation of one microbatch on one
(virtual) stage."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

__all__ = ["KINDS", "Action", "Kind"]

Kind = Literal["F", "B", "I", "W"]
KINDS: tuple[Kind, ...] = ("F", "B", "I", "W")
"""``F`` forward; ``B`` full backward (input and weight gradients together); ``I`` the
input gradient only; ``W`` the weight gradient only. The letters are
torch.distributed.pipelining's (``_ComputationType``)."""

_ACTION = re.compile(r"^(\d+)([FBIW])(\d+)$")


@dataclass(frozen=True, order=True)
class Action:
    """Run ``kind`` (``F``, ``B``, ``I`` or ``W``) of microbatch ``mb`` on ``stage``."""

    stage: int
    kind: Kind
    mb: int

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.mb}"

    @classmethod
    def from_str(cls, text: str) -> Action:
        """Parse the compact form ``"2I0"`` (stage 2, input gradient, microbatch 0)."""
        match = _ACTION.match(text.strip())
        if match is None:
            raise ValueError(f"not an action: {text!r} (expected stage, one of F B I W, "
                             "microbatch, e.g. '2F0' or '0W3')")
        stage, kind, mb = match.groups()
        return cls(int(stage), kind, int(mb))  # type: ignore[arg-type]
