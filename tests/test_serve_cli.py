"""`shardline serve` with a bad value (issue 17): the real command in a subprocess ends
with exit code 2 and one line on stderr that names the flag, before it starts anything;
every option's help says its default."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BAD = {
    # value errors inside the server once (ValueError, OverflowError, logging's)
    "too many stages": (["--model", "minilm", "--stages", "9", "--workers", "0"],
                        "--stages 9"),
    "port out of range": (["--port", "99999"], "--port"),
    "log level": (["--log-level", "bogus"], "--log-level"),
    # one meaning for --workers: never more than the stages (x replicas) need
    "idle workers": (["--stages", "2", "--workers", "5"], "--workers 5"),
    "negative workers": (["--workers", "-1"], "--workers"),
    "replicas in this process": (["--replicas", "2", "--workers", "0"], "--replicas 2"),
    "copies on one worker": (["--replicas", "2", "--workers", "2"], "different workers"),
    # never untrained weights by accident
    "empty gpt path": (["--model", "gpt:"], "gpt:DIR"),
    "empty hf path": (["--model", "hf:"], "hf:DIR"),
    "no such checkpoint": (["--model", "hf:/nonexistent/dir"], "not a directory"),
    "unknown model": (["--model", "llama-70b"], "unknown model"),
    "stages": (["--stages", "0"], "--stages"),
    "not a number": (["--max-batch", "many"], "--max-batch"),
    "negative wait": (["--max-wait-ms", "-1"], "--max-wait-ms"),
    "zero timeout": (["--body-timeout", "0"], "--body-timeout"),
    "quantize": (["--quantize", "int4"], "--quantize"),
}


def serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shardline.cli", "serve", "--port", "0",
                           *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_value_is_one_line_and_exit_code_2(case: str) -> None:
    args, named = BAD[case]
    done = serve(*args)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("shardline serve: ") and named in lines[0], lines[0]
    assert done.stdout == ""  # nothing started: the first stdout line names the URL


def test_a_checkpoint_directory_of_something_else_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    done = serve("--model", f"hf:{tmp_path}")
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1, done.stderr
    done = serve("--model", f"gpt:{tmp_path}")
    assert done.returncode == 2 and "Pipeline.save" in done.stderr, done.stderr


def test_every_option_says_its_default() -> None:
    text = subprocess.run([sys.executable, "-m", "shardline.cli", "serve", "--help"],
                          capture_output=True, text=True, timeout=60).stdout
    options = re.split(r"\n  (?=--)", text.split("options:", 1)[1])[1:]
    assert len(options) >= 17
    for option in options:
        flat = " ".join(option.split())
        assert "(default" in flat, flat
