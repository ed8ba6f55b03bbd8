"""The ``Actor`` base class and the table of methods a peer may call."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from ._node import Node
    from ._ref import ActorRef

__all__ = ["Actor", "MethodTable", "method_table"]

# (function, is_coroutine_function): knowing up front whether to await saves an
# ``inspect`` call per message on the hot path.
MethodTable = dict[str, tuple[Callable[..., Any], bool]]

_HOOKS = frozenset({"on_start", "on_stop"})


class Actor:
    """Subclass this; every public method (no leading underscore) becomes callable.

    ``max_concurrency`` > 1 lets that many messages be handled at once (useful for
    actors that mostly wait on I/O or on other actors); the default handles one at a
    time, in arrival order.
    """

    max_concurrency: ClassVar[int] = 1

    # Set by the node before ``__init__`` runs, so constructors may use them.
    _sl_ref: ActorRef
    _sl_node: Node

    async def on_start(self) -> None:
        """Runs once before the first message (and again after each restart)."""

    async def on_stop(self) -> None:
        """Runs once when the actor stops gracefully; pending asks have already failed."""

    @property
    def ref(self) -> ActorRef:
        """This actor's own ref, to hand to others or to send to itself."""
        return self._sl_ref

    @property
    def node(self) -> Node:
        """The node this actor lives on (spawn children, look up peers)."""
        return self._sl_node


_tables: dict[type[Actor], MethodTable] = {}


def method_table(cls: type[Actor]) -> MethodTable:
    """Public callable attributes of ``cls`` and whether each is a coroutine function."""
    table = _tables.get(cls)
    if table is None:
        table = {}
        for name in dir(cls):
            if name.startswith("_") or name in _HOOKS:
                continue
            attr = inspect.getattr_static(cls, name)
            if isinstance(attr, (staticmethod, classmethod, property)):
                continue
            if callable(attr):
                table[name] = (attr, inspect.iscoroutinefunction(attr))
        _tables[cls] = table
    return table
