"""A shardline actor inside a FastAPI app: the actor owns the state, handlers ask it.

An actor processes one message at a time, so the leaderboard needs no lock however many
requests arrive at once, and the same actor could live on another machine without the
handlers changing.

Run: python examples/custom_actor_service.py          (serves 127.0.0.1:8080, Ctrl-C stops)
     python examples/custom_actor_service.py --check  (starts, sends requests, stops)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import socket
from collections.abc import AsyncIterator

import anyio
import httpx
import uvicorn
from fastapi import FastAPI

import shardline as sl


class Leaderboard(sl.Actor):
    def __init__(self) -> None:
        self.scores: dict[str, int] = {}

    def add(self, name: str, points: int) -> int:
        self.scores[name] = self.scores.get(name, 0) + points
        return self.scores[name]

    def top(self, n: int) -> list[tuple[str, int]]:
        return sorted(self.scores.items(), key=lambda kv: -kv[1])[:n]


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with sl.Node() as node:  # the node lives as long as the app
        app.state.board = await node.spawn(Leaderboard, name="leaderboard")
        yield


app = FastAPI(lifespan=lifespan)


@app.post("/score/{name}")
async def score(name: str, points: int = 1) -> dict[str, int]:
    return {name: await app.state.board.add(name, points)}


@app.get("/top")
async def top(n: int = 3) -> list[tuple[str, int]]:
    return await app.state.board.top(n)  # type: ignore[no-any-return]


async def check() -> None:
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: server.serve(sockets=[sock]))
        while not server.started:  # noqa: ASYNC110 (uvicorn offers no event to await)
            await anyio.sleep(0.05)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        async with httpx.AsyncClient(base_url=url) as client:
            async with anyio.create_task_group() as players:  # concurrent updates
                for name, points in [("ada", 5), ("bob", 3), ("ada", 2), ("cy", 4)] * 10:
                    players.start_soon(functools.partial(
                        client.post, f"/score/{name}", params={"points": points}))
            print("top 3:", (await client.get("/top")).json())
        server.should_exit = True


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true")
    if parser.parse_args().check:
        anyio.run(check)
    else:
        uvicorn.run(app, host="127.0.0.1", port=8080)
