"""Actor classes shared by the tests (importable by path for subprocess nodes later)."""

from __future__ import annotations

from typing import Any

import anyio

import shardline as sl


class Counter(sl.Actor):
    def __init__(self, start: int = 0) -> None:
        self.value = start
        self.stopped = False

    async def incr(self, by: int = 1) -> int:
        self.value += by
        return self.value

    def get(self) -> int:  # a sync method runs on the loop
        return self.value

    async def fail(self, message: str = "boom") -> None:
        raise ValueError(message)

    def _secret(self) -> str:
        return "never callable"


class Recorder(sl.Actor):
    """Remembers the order messages arrived in."""

    def __init__(self) -> None:
        self.log: list[tuple[Any, int]] = []

    async def record(self, sender: Any, seq: int) -> int:
        self.log.append((sender, seq))
        return seq

    def entries(self) -> list[tuple[Any, int]]:
        return list(self.log)


class Sleeper(sl.Actor):
    """Handlers block on a gate the test holds; counts how many are active at once."""

    def __init__(self) -> None:
        self.active = 0
        self.peak = 0
        self.handled = 0
        self.cancelled = 0

    async def wait(self, gate: anyio.Event) -> int:
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await gate.wait()
        except BaseException:
            self.cancelled += 1
            raise
        finally:
            self.active -= 1
        self.handled += 1
        return self.handled

    async def hang(self) -> None:
        try:
            await anyio.sleep_forever()
        except BaseException:
            self.cancelled += 1
            raise

    async def nap(self, seconds: float) -> float:
        await anyio.sleep(seconds)
        self.handled += 1
        return seconds

    def stats(self) -> dict[str, int]:
        return {"peak": self.peak, "handled": self.handled, "cancelled": self.cancelled,
                "active": self.active}


class Echo(sl.Actor):
    """Returns what it was given (values cross the wire twice)."""

    def echo(self, value: Any) -> Any:
        return value

    def echo_many(self, *args: Any, **kwargs: Any) -> list[Any]:
        return [list(args), kwargs]

    async def call(self, ref: sl.ActorRef, method: str, *args: Any) -> Any:
        """Call another actor from here: refs resolve on whatever node holds them."""
        return await ref.ask(method, *args, timeout=10.0)

    def pid(self) -> int:
        import os

        return os.getpid()

    def peers(self) -> list[str]:
        return [p.address for p in self.node.peers()]


class Tidy(sl.Actor):
    """Leaves a file behind from on_stop: proof that a worker stopped it gracefully."""

    def __init__(self, path: str) -> None:
        self.path = path

    async def on_stop(self) -> None:
        with open(self.path, "w") as f:
            f.write("on_stop ran")
