"""`shardline demo` end to end, and Ctrl-C in the middle of it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def demo(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "shardline.cli", "demo", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.timeout(240)
def test_demo_trains_samples_and_writes_its_files(tmp_path: Path) -> None:
    proc = demo("--steps", "4", "--out", str(tmp_path / "out"))
    out, err = proc.communicate(timeout=200)
    assert proc.returncode == 0, err
    assert "summary" in out and "loss" in out and "tokens/s" in out and "bubble" in out
    assert out.count("    | ") == 3  # three samples through the pipeline
    trace = json.loads((tmp_path / "out" / "timeline.json").read_text())
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert {e["name"] for e in spans} >= {f"{k}{mb}" for k in "FB" for mb in range(4)}
    assert {e["pid"] for e in spans if e["cat"] in ("F", "B")} == {0, 1}
    assert (tmp_path / "out" / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((tmp_path / "out" / "checkpoint" / "shardline.json").read_text())
    assert manifest["model"]["factory"] == "shardline.models.gpt:layers"


@pytest.mark.timeout(120)
def test_ctrl_c_stops_the_demo_and_its_workers(tmp_path: Path) -> None:
    proc = demo("--seconds", "120", "--out", str(tmp_path / "out"))
    try:
        assert proc.stdout is not None
        assert "shardline demo" in proc.stdout.readline()
        assert "workers up" in proc.stdout.readline()
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert len(children) == 2
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        assert proc.returncode == 130
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{c}").exists() for c in children):
            assert time.monotonic() < deadline, "a worker outlived the demo"
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
