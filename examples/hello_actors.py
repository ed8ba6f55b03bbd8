"""Hello, actors: spawn one, ask it, tell it, stop it. Run: python examples/hello_actors.py"""

import shardline as sl


class Counter(sl.Actor):
    def __init__(self, start: int = 0) -> None:
        self.value = start

    async def incr(self, by: int = 1) -> int:
        self.value += by
        return self.value


async def main() -> None:
    async with sl.Node() as node:
        c = await node.spawn(Counter, 5, name="counter")
        print("incr(2) ->", await c.incr(2))                  # ask by attribute: 7
        print("ask incr ->", await c.ask("incr", 1, timeout=2.0))  # 8
        await c.tell("incr", 1)                               # fire-and-forget
        print("after tell ->", await c.incr(0))               # 9: same sender, in order
        assert node.ref("counter") == c
        await c.stop()
        print("stopped:", (await c.wait_stopped()).reason.value)


if __name__ == "__main__":
    sl.run(main())
