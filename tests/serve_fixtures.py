"""``shardline serve`` as a user runs it: a subprocess with its worker processes, its
stderr kept in a file; and a few helpers over its HTTP API."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx


class Server:
    """``shardline serve --port 0 ARGS``; ``url`` from the first line it prints."""

    def __init__(self, log: Path, *args: str) -> None:
        self.log = log
        with log.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "shardline.cli", "serve", "--port", "0",
                 "--log-level", "info", *args],
                stdout=subprocess.PIPE, stderr=err, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("shardline serve http://"), (line, log.read_text()[-3000:])
        self.url = line.split()[2]
        host, port = self.url.removeprefix("http://").rsplit(":", 1)
        self.address = (host, int(port))

    def connect(self, timeout: float = 60.0) -> socket.socket:
        sock = socket.create_connection(self.address, timeout=timeout)
        sock.settimeout(timeout)
        return sock

    def workers(self) -> list[int]:
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return [int(p) for p in children.read_text().split()]

    def kill_worker(self, rng: random.Random | None = None) -> int:
        pid = (rng or random).choice(self.workers())
        os.kill(pid, signal.SIGKILL)
        return pid

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", timeout=60).text
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line and not line.startswith("#")}

    def recoveries(self, what: str) -> float:
        return self.metrics()[f'shardline_recoveries_total{{what="{what}"}}']

    def wait_healthy(self, timeout: float = 90.0) -> None:
        """Until /healthz answers 200 (the bound only keeps a broken server from
        hanging the test; the benchmark holds the time target)."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = httpx.get(f"{self.url}/healthz", timeout=30)
                if last.status_code == 200:
                    return
            except httpx.HTTPError as exc:
                last = exc
            time.sleep(0.2)
        raise AssertionError(f"/healthz not 200 within {timeout} s: {last!r} "
                             f"{getattr(last, 'text', '')}")

    def errors(self) -> list[str]:
        return [line for line in self.log.read_text().splitlines()
                if "ERROR" in line or "Traceback" in line]

    def close(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def unavailable_properly(response: httpx.Response) -> bool:
    """A 503 as a client can act on it: OpenAI's error shape and ``Retry-After``."""
    if response.status_code != 503:
        return False
    error = response.json()["error"]
    return bool(error["message"]) and error["type"] == "server_error" and \
        int(response.headers["Retry-After"]) >= 1


def sse(text: str) -> list[dict[str, Any]]:
    """The JSON events of a server-sent-event body, checking it ends with [DONE]."""
    events = [line.removeprefix("data: ") for line in text.split("\n\n") if line]
    assert events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]
