"""Entry points to the event loop: ``run`` and ``to_thread``."""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import anyio
import anyio.to_thread

__all__ = ["run", "to_thread"]

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T] | Callable[[], Coroutine[Any, Any, T]], *,
        use_uvloop: bool = True) -> T:
    """Run ``main`` (a coroutine, or an async function taking no arguments) to completion.

    Uses asyncio with uvloop when it is installed and ``use_uvloop`` is true.
    """
    if use_uvloop:
        try:
            import uvloop  # noqa: F401
        except ImportError:
            use_uvloop = False

    async def _main() -> T:
        return await (main if isinstance(main, Coroutine) else main())

    return anyio.run(_main, backend="asyncio", backend_options={"use_uvloop": use_uvloop})


async def to_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run blocking ``fn(*args, **kwargs)`` in a worker thread, keeping the loop responsive.

    Use it for CPU-heavy work inside actors (a torch forward): the node keeps
    answering other messages and heartbeats meanwhile.
    """
    return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))
