"""Why an actor stopped, and the restart policy that decides when it must."""

from __future__ import annotations

import enum
import time
from collections import deque
from dataclasses import dataclass
from typing import Literal

__all__ = ["OnError", "RestartPolicy", "StopInfo", "StopReason"]

OnError = Literal["resume", "restart", "stop"]


class StopReason(str, enum.Enum):
    STOPPED = "stopped"
    """Graceful: ``ref.stop()`` or the node shutting down."""
    FAILED = "failed"
    """A method raised and the actor was spawned with ``on_error="stop"``."""
    RESTARTS_EXHAUSTED = "restarts_exhausted"
    """``on_error="restart"`` and more than ``max_restarts`` failures within ``within`` s."""
    NODE_LOST = "node_lost"
    """The node hosting the actor stopped answering."""


@dataclass(frozen=True)
class StopInfo:
    """What ``ActorRef.wait_stopped()`` returns."""

    reason: StopReason
    error: str | None = None
    """``"TypeName: message"`` of the failure that stopped the actor, if one did."""


class RestartPolicy:
    """Counts failures in a sliding window; answers whether one more restart is allowed.

    Pure and clock-injectable so the give-up arithmetic is tested without sleeping.
    """

    def __init__(self, max_restarts: int, within: float) -> None:
        if max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {max_restarts}")
        if within <= 0:
            raise ValueError(f"within must be > 0 seconds, got {within}")
        self.max_restarts = max_restarts
        self.within = within
        self._restarts: deque[float] = deque()

    @property
    def restarts(self) -> int:
        """Restarts inside the current window."""
        return len(self._restarts)

    def allow_restart(self, now: float | None = None) -> bool:
        """Record a failure at ``now``; True when a restart is still within budget."""
        now = time.monotonic() if now is None else now
        window_start = now - self.within
        while self._restarts and self._restarts[0] <= window_start:
            self._restarts.popleft()
        if len(self._restarts) >= self.max_restarts:
            return False
        self._restarts.append(now)
        return True
