"""examples/slurm/train.sbatch under a real one-node Slurm (Debian's slurm-wlm), set up
by examples/slurm/local-slurm.sh, the recipe docs/clusters.md walks through."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "slurm" / "local-slurm.sh"
TOOLS = ("munged", "slurmctld", "slurmd", "srun", "sbatch", "sinfo")


def _install() -> str | None:
    """Install slurm-wlm and munge if they are missing; why not, if that cannot be."""
    if all(shutil.which(t) for t in TOOLS):
        return None
    if shutil.which("apt-get") is None:
        return "needs Slurm (slurm-wlm, munge) and there is no apt-get to install it"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"]):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
        if done.returncode != 0:
            return f"installing Slurm failed: {' '.join(cmd)}: {done.stderr[-500:]}"
    missing = [t for t in TOOLS if not shutil.which(t)]
    return f"Slurm installed without {missing}" if missing else None


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A running one-node Slurm for this test session: ``{"SLURM_CONF": path}``."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        pytest.skip("needs root on Linux to run Slurm's daemons")
    reason = _install()
    if reason:
        pytest.skip(reason)
    where = tmp_path_factory.mktemp("slurm")
    started = subprocess.run([str(SCRIPT), "start", str(where)], capture_output=True,
                             text=True, timeout=120)
    try:
        assert started.returncode == 0, started.stderr
        assert f"export SLURM_CONF={where}/slurm.conf" in started.stdout
        yield {"SLURM_CONF": str(where / "slurm.conf")}
    finally:
        subprocess.run([str(SCRIPT), "stop", str(where)], capture_output=True, timeout=120)


def _wait(job: str, env: dict[str, str], timeout: float) -> str:
    """The job's record once it has ended (``sbatch --wait`` polls every few seconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        shown = subprocess.run(["scontrol", "show", "job", "-o", job], env=env,
                               capture_output=True, text=True, timeout=30).stdout
        if not any(f"JobState={s}" in shown for s in ("PENDING", "RUNNING", "CONFIGURING",
                                                      "COMPLETING")):
            return shown
        time.sleep(0.2)
    subprocess.run(["scancel", job], env=env, timeout=30)
    raise AssertionError(f"job {job} still running after {timeout} s")


@pytest.mark.timeout(600)
def test_the_sbatch_example_trains_over_the_jobs_tasks(slurm: dict[str, str],
                                                      tmp_path: Path) -> None:
    out = tmp_path / "job.out"
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, **slurm, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "SHARDLINE_KEYS_DIR": str(tmp_path / "keys")}
    # --overcommit: three tasks on however few cores this machine has
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--overcommit", f"--chdir={ROOT}", f"--output={out}",
         "examples/slurm/train.sbatch", "--steps", "3", "--dim", "32", "--blocks", "2",
         "--seq", "32", "--batch", "8", "--microbatches", "2",
         "--out", str(tmp_path / "checkpoint")],
        env=env, capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    state = _wait(submitted.stdout.strip().split(";")[0], env, timeout=540)
    log = out.read_text() if out.exists() else ""
    assert "JobState=COMPLETED" in state and "ExitCode=0:0" in state, f"{state}\n{log[-4000:]}"
    assert "stage on rank 1:" in log and "stage on rank 2:" in log, log
    assert "as rank 1 of 3" in log and "as rank 2 of 3" in log, log
    assert "step 3/3" in log and "checkpoint in" in log, log
    assert (tmp_path / "checkpoint").is_dir()
    assert (tmp_path / "keys" / "node.key_secret").is_file()   # made by the batch script
