"""``shardline run``: one command per rank, as launchers start it (SHARDLINE_*
variables as four local processes, and a real torchrun)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent("""
    import json, sys
    import shardline as sl

    async def main() -> None:
        async with sl.Cluster.from_env(timeout=60) as cluster:
            seen = []
            for node in cluster.nodes:
                actor = await node.spawn("tests.cluster_fixtures:Fragile")
                seen.append({"rank": node.rank, "local_rank": node.local_rank,
                             "pid": await actor.pid(), "devices": node.devices,
                             "source": cluster.launch.source})
        with open(sys.argv[1], "w") as f:
            json.dump(seen, f)
        raise SystemExit(int(sys.argv[2]))

    sl.run(main())
""")

FAILING = "raise RuntimeError('the script failed before forming a cluster')\n"

RESTARTING = textwrap.dedent("""
    import json, os, signal, sys, time
    import anyio
    import shardline as sl

    async def main() -> None:
        out = {}
        async with sl.Cluster.from_env(timeout=60) as cluster:
            old = cluster.nodes[0]
            fragile = await old.spawn("tests.cluster_fixtures:Fragile")
            pid = await fragile.pid()
            async with anyio.create_task_group() as tg:
                async def parked() -> None:
                    try:
                        await fragile.hang()
                    except sl.NodeLost as exc:
                        out["lost"] = str(exc)
                        out["after"] = time.monotonic() - killed
                tg.start_soon(parked)
                await anyio.sleep(0.2)
                killed = time.monotonic()
                os.kill(pid, signal.SIGKILL)
            new = await cluster.replacement(old, timeout=60)
            again = await new.spawn("tests.cluster_fixtures:Fragile")
            out.update(old_pid=pid, new_pid=await again.pid(), rank=new.rank,
                       nodes=[n.rank for n in cluster.nodes])
        with open(sys.argv[1], "w") as f:
            json.dump(out, f)

    sl.run(main())
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_env() -> dict[str, str]:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SHARDLINE_", "SLURM_", "OMPI_")) and k not in drop}
    env["PYTHONPATH"] = os.pathsep.join(p or os.getcwd() for p in sys.path)
    return env


def launch(world: int, script: Path, *args: str, run_args: tuple[str, ...] = ()
           ) -> list[subprocess.Popen[str]]:
    """Start every rank as a launcher would: same command, rank in the environment."""
    head = f"127.0.0.1:{free_port()}"
    return [subprocess.Popen(
        [sys.executable, "-m", "shardline.cli", "run", "--allow", "tests", *run_args,
         str(script), *args],
        env={**base_env(), "SHARDLINE_RANK": str(r), "SHARDLINE_WORLD_SIZE": str(world),
             "SHARDLINE_HEAD": head, "LOCAL_RANK": str(r)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]


def results(procs: list[subprocess.Popen[str]], timeout: float = 90) -> list[tuple[int, str]]:
    try:
        done = [p.communicate(timeout=timeout) for p in procs]
        return [(p.returncode, err) for p, (_, err) in zip(procs, done, strict=True)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()


@pytest.mark.timeout(120)
def test_every_rank_runs_the_same_command(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out.json"
    ended = results(launch(4, script, str(out), "3"))
    assert [code for code, _ in ended] == [3, 0, 0, 0], ended   # the script's status on 0
    seen = json.loads(out.read_text())
    assert [s["rank"] for s in seen] == [1, 2, 3]
    assert [s["local_rank"] for s in seen] == [1, 2, 3]
    assert all(s["devices"] == ["cpu"] and s["source"] == "SHARDLINE_RANK" for s in seen)
    assert len({s["pid"] for s in seen}) == 3


@pytest.mark.timeout(120)
def test_a_script_that_fails_early_still_ends_every_rank(tmp_path: Path) -> None:
    script = tmp_path / "fail.py"
    script.write_text(FAILING)
    ended = results(launch(3, script))
    assert [code for code, _ in ended] == [1, 0, 0], ended
    assert "the script failed before forming a cluster" in ended[0][1]
    assert all("the script on rank 0 ended (exit status 1)" in err for _, err in ended[1:])


@pytest.mark.timeout(120)
def test_a_dead_worker_rank_is_named_at_once_and_restarted(tmp_path: Path) -> None:
    script = tmp_path / "restart.py"
    script.write_text(RESTARTING)
    out = tmp_path / "out.json"
    # A long peer timeout: only the supervisor's report can name the death this fast.
    ended = results(launch(3, script, str(out),
                           run_args=("--restarts", "1", "--peer-timeout", "60")))
    assert [code for code, _ in ended] == [0, 0, 0], ended
    seen = json.loads(out.read_text())
    assert seen["lost"].startswith(f"worker rank 1 (pid {seen['old_pid']} on "
                                   f"{socket.gethostname()}")
    assert seen["lost"].endswith("killed by SIGKILL")
    assert seen["after"] < 30          # well inside the peer timeout (timing: bench)
    assert seen["rank"] == 1 and seen["new_pid"] != seen["old_pid"]
    assert seen["nodes"] == [1, 2]
    assert "rank 1's worker" in ended[1][1] and "restarting" in ended[1][1]


@pytest.mark.timeout(180)
def test_under_torchrun(tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    shardline = shutil.which("shardline", path=str(Path(sys.executable).parent))
    if torchrun is None or shardline is None:
        pytest.skip("torchrun and the shardline command must be installed beside python")
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out.json"
    proc = subprocess.run(
        [torchrun, "--nproc-per-node", "3", "--master-addr", "127.0.0.1", "--master-port",
         str(free_port()), "--no-python", shardline, "run", "--allow", "tests", str(script),
         str(out), "0"], env=base_env(), capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(out.read_text())
    assert [(s["rank"], s["local_rank"], s["source"]) for s in seen] == [
        (1, 1, "torchrun"), (2, 2, "torchrun")]


@pytest.mark.timeout(240)
def test_the_example_script_trains_under_shardline_run(tmp_path: Path) -> None:
    """examples/slurm/train.py (what train.sbatch and the StatefulSet run) on 3 local
    ranks; the real Slurm run is tests/test_cluster_slurm.py."""
    script = Path(__file__).resolve().parent.parent / "examples" / "slurm" / "train.py"
    procs = launch(3, script, "--steps", "2", "--dim", "32", "--blocks", "2", "--seq", "32",
                   "--batch", "8", "--microbatches", "2", "--out", str(tmp_path / "ckpt"))
    try:
        outs = [p.communicate(timeout=200) for p in procs]
    finally:
        results(procs)   # reaps whatever is left
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in outs]
    assert "stage on rank 1:" in outs[0][0] and "stage on rank 2:" in outs[0][0]
    assert "step 2/2" in outs[0][0] and (tmp_path / "ckpt").is_dir()
