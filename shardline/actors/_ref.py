"""``ActorRef``: a value naming one actor, usable from anywhere that can reach it."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, Protocol

from .._errors import MethodNotFound
from ._lifecycle import StopInfo

__all__ = ["ActorRef", "BoundMethod", "Target"]


class Target(Protocol):
    """Where a ref delivers: a local actor cell, or (later) a remote node's proxy."""

    def ask(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
            timeout: float | None) -> Awaitable[Any]: ...

    def tell(self, method: str, args: tuple[Any, ...],
             kwargs: dict[str, Any]) -> Awaitable[None]: ...

    def stop(self) -> Awaitable[None]: ...

    def wait_stopped(self) -> Awaitable[StopInfo]: ...


class BoundMethod:
    """``ref.method``: call it to ask, or use ``.tell(...)`` / ``.ask(..., timeout=)``."""

    __slots__ = ("_name", "_target")

    def __init__(self, target: Target, name: str) -> None:
        self._target = target
        self._name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Awaitable[Any]:
        return self._target.ask(self._name, args, kwargs, None)

    def ask(self, *args: Any, timeout: float | None = None, **kwargs: Any) -> Awaitable[Any]:
        return self._target.ask(self._name, args, kwargs, timeout)

    def tell(self, *args: Any, **kwargs: Any) -> Awaitable[None]:
        return self._target.tell(self._name, args, kwargs)

    def __repr__(self) -> str:
        return f"<bound actor method {self._name!r}>"


class ActorRef:
    """A handle to one actor. Equal refs name the same actor, wherever they were made.

    Actor methods are reachable as attributes (``await ref.incr(2)``); a method whose
    name clashes with the ref's own (``ask``, ``tell``, ``stop``, ...) is reached with
    ``ref.ask("stop")``.
    """

    def __init__(self, address: str, actor_id: int, name: str | None, target: Target) -> None:
        self.address = address
        """Address of the node the actor lives on."""
        self.actor_id = actor_id
        """Node-local id; unique for the node's lifetime, never reused."""
        self.name = name
        self._target = target

    def ask(self, method: str, *args: Any, timeout: float | None = None,
            **kwargs: Any) -> Awaitable[Any]:
        """Call ``method`` and return its result; ``AskTimeout`` past ``timeout`` seconds."""
        return self._target.ask(method, args, kwargs, timeout)

    def tell(self, method: str, *args: Any, **kwargs: Any) -> Awaitable[None]:
        """Enqueue a call without waiting for it; waits only while the mailbox is full."""
        return self._target.tell(method, args, kwargs)

    def stop(self) -> Awaitable[None]:
        """Stop gracefully: the current message finishes, queued ones fail, on_stop runs."""
        return self._target.stop()

    def wait_stopped(self) -> Awaitable[StopInfo]:
        """Wait until the actor stops, for any reason; returns why."""
        return self._target.wait_stopped()

    def __getattr__(self, name: str) -> BoundMethod:
        if name.startswith("__") and name.endswith("__"):
            # Python's own probes (copy, pickle, hasattr of special names) must see a
            # plain missing attribute.
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        if name.startswith("_"):
            # Not an actor method, whatever the actor defines; MethodNotFound is also an
            # AttributeError, so getattr(ref, name, default) and hasattr still work.
            raise MethodNotFound(f"{name!r} is not an actor method: names starting with "
                                 f"'_' are private ({self!r})")
        method = BoundMethod(self._target, name)
        # Cache on the instance: later lookups skip __getattr__ entirely.
        self.__dict__[name] = method
        return method

    # A ref names an actor; a copy would name the same one, so it is the ref itself
    # (deep-copying the target would try to copy a live node).
    def __copy__(self) -> ActorRef:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> ActorRef:
        return self

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ActorRef):
            return NotImplemented
        return self.actor_id == other.actor_id and self.address == other.address

    def __hash__(self) -> int:
        return hash((self.address, self.actor_id))

    def __repr__(self) -> str:
        label = f" {self.name!r}" if self.name else ""
        return f"<ActorRef{label} #{self.actor_id} at {self.address}>"
