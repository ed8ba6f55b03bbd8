"""``shardline demo``'s output: a bar on a terminal, plain lines in a log, a summary that
says what its figures are; and ``--workers 0``."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from shardline.demo import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_redraws_one_bar_on_a_terminal() -> None:
    out = Terminal()
    progress = Progress(out)
    for step in range(1, 11):
        progress.update(step / 10, step, 5.0 - step / 10, 1000.0, 20.0)
    progress.close()
    text = out.getvalue()
    assert text.count("\r") == 10 and text.count("\n") == 1
    assert "[" + "#" * 30 + "]" in text and "#" * 31 not in text  # 30 cells, full at the end
    assert "step   10  loss  4.000" in text.rsplit("\r", 1)[1]


def test_progress_off_a_terminal_prints_a_line_every_few_seconds() -> None:
    out, clock = io.StringIO(), Clock()
    progress = Progress(out, every=5.0, clock=clock)
    for step in range(1, 101):           # 100 steps, 0.25 s each: 25 s
        clock.now = step * 0.25
        progress.update(step / 100, step, 1.0, 1000.0, 250.0)
    progress.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    # the first step, then one line per 5 s, and the last step
    steps = [int(line.split("step")[1].split()[0]) for line in lines]
    assert steps == [1, 21, 41, 61, 81, 100]
    assert lines[-1].startswith("  100%")


@pytest.mark.timeout(180)
def test_demo_in_process_prints_lines_and_a_labelled_summary(tmp_path: Path) -> None:
    """``--workers 0`` keeps the stages in this process (as ``serve --workers 0``); a
    pipe is not a terminal, so the progress is plain lines."""
    proc = subprocess.run([sys.executable, "-m", "shardline.cli", "demo", "--workers", "0",
                           "--steps", "7", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stdout
    assert "in this process" in proc.stdout.splitlines()[0]
    progress = [line for line in proc.stdout.splitlines() if "ms/step" in line]
    assert progress[0].split()[:3] == ["14%", "step", "1"]
    assert progress[-1].split()[:3] == ["100%", "step", "7"]
    summary = next(line for line in proc.stdout.splitlines() if line.startswith("  loss"))
    assert "mean of the first 3 and of the last 3 steps of 7" in summary
    assert (tmp_path / "out" / "checkpoint" / "model.safetensors").is_file()


@pytest.mark.timeout(120)
def test_demo_starts_no_more_workers_than_devices(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "shardline.cli", "demo", "--workers", "5",
                           "--steps", "1", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stderr
    assert "warning:" in proc.stderr and "starting 2, not 5" in proc.stderr
    assert "in 2 worker processes" in proc.stdout
