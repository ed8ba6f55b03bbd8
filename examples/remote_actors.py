"""Actors in other processes, used exactly like local ones.

Starts two worker nodes (subprocesses on 127.0.0.1), spawns an actor on each, and hands
a ref from one to the other. Run: python examples/remote_actors.py
"""

import shardline as sl


class Counter(sl.Actor):
    def __init__(self, start: int = 0) -> None:
        self.value = start

    async def incr(self, by: int = 1) -> int:
        self.value += by
        return self.value


class Caller(sl.Actor):
    async def poke(self, target: sl.ActorRef, times: int) -> int:
        # The ref arrived as an argument; this node calls the counter's node directly.
        for _ in range(times):
            value = await target.incr()
        return value


async def main() -> None:
    # The workers import this file as the module "remote_actors", so allow it.
    async with sl.LocalCluster(2, allow=["remote_actors"]) as cluster:
        a, b = cluster.nodes
        counter = await a.spawn("remote_actors:Counter", 10, name="counter")
        caller = await b.spawn("remote_actors:Caller")
        print("counter lives at", counter.address)
        print("caller on", b.address, "poked it to", await caller.poke(counter, 5))
        same = await cluster.node.lookup(a.address, "counter")
        print("lookup by name finds the same actor:", same == counter)
        try:
            await counter.ask("incr", "not a number", timeout=5.0)
        except sl.ActorError as exc:
            print("remote errors arrive typed:", exc.type_name, "-", exc.message)


if __name__ == "__main__":
    sl.run(main())
