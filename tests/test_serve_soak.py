"""A short run of bench/soak.py: mixed load with hostile requests against a real
`shardline serve` with two worker processes. Nothing a client sends is a 5xx, and the
server lives through it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# what each hostile request may end in: its status, or what the client saw
EXPECTED = {"huge": {"413"}, "deep": {"400"}, "surrogate": {"400"}, "not_utf8": {"400"},
            "truncated": {"sent"}, "idle": {"closed"}, "half_head": {"408"}}


@pytest.mark.timeout(300)
def test_a_short_soak_has_no_5xx_and_the_server_survives() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--seconds", "20", "--clients", "32",
         "--hostile", "0.05"], cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["server_alive"] and result["server_log_errors"] == 0
    assert result["count_5xx"] == 0, result["5xx_by_code"]
    assert result["count_2xx"] > 0
    assert set(result["by_status"]) <= {"200", "429"}, result["by_status"]
    assert sum(sum(codes.values()) for codes in result["hostile"].values()) > 0
    for kind, codes in result["hostile"].items():
        assert set(codes) <= EXPECTED[kind], (kind, codes)
    assert result["loop_lag_p99_s"] is not None
    assert len(result["rss_mb_end"]["workers"]) == 2
