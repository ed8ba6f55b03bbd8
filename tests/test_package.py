"""The import surface, the console script and the examples."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

import shardline as sl

ROOT = Path(__file__).resolve().parent.parent


def test_export_list_is_exact() -> None:
    public = {name for name in vars(sl) if not name.startswith("_")}
    modules = {"actors", "cli"} | {n for n in public if type(getattr(sl, n)).__name__ == "module"}
    assert public - modules == set(sl.__all__) - {"__version__"}
    for name in sl.__all__:
        assert getattr(sl, name) is not None


def test_errors_form_one_hierarchy() -> None:
    for name in ("ActorError", "ActorNotFound", "MethodNotFound", "ActorStopped", "AskTimeout",
                 "NodeLost", "SerializationError", "ProtocolError", "Unauthorized",
                 "ActorNameTaken"):
        assert issubclass(getattr(sl, name), sl.ShardlineError)
    assert issubclass(sl.AskTimeout, TimeoutError)


def test_import_does_not_pull_in_torch() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import sys, shardline; print('torch' in sys.modules)"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    assert out.stdout.strip() == "False"


def test_console_script_version() -> None:
    out = subprocess.run([sys.executable, "-m", "shardline.cli", "--version"],
                         capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == f"shardline {sl.__version__}"


# Short runs of the long examples: enough to exercise every code path.
EXAMPLE_ARGS = {"train_gpt.py": ["--steps", "3", "--dim", "32", "--blocks", "2",
                                 "--replicas", "2"],
                "custom_actor_service.py": ["--check"]}


@pytest.mark.parametrize("example", sorted(p.name for p in (ROOT / "examples").glob("*.py")))
def test_example_runs(example: str, tmp_path: Path) -> None:
    args = EXAMPLE_ARGS.get(example, [])
    if example == "train_gpt.py":
        args = [*args, "--out", str(tmp_path / "ckpt")]
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / example), *args],
                          capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()


def test_cluster_by_hand_walkthrough(tmp_path: Path) -> None:
    """examples/cluster_by_hand.md: two `shardline node`s, then its script."""
    text = (ROOT / "examples" / "cluster_by_hand.md").read_text()
    script = text.split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "drive.py").write_text(script)
    assert text.count("shardline node --listen tcp://127.0.0.1:555") == 2
    nodes = [subprocess.Popen([sys.executable, "-m", "shardline.cli", "node", "--listen",
                               "tcp://127.0.0.1:0"], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        addresses = []
        for node in nodes:
            assert node.stdout is not None
            addresses.append(node.stdout.readline().split()[2])
        proc = subprocess.run([sys.executable, str(tmp_path / "drive.py"), *addresses],
                              capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
        assert "loss after 20 steps" in proc.stdout and "continuation: the quick" in proc.stdout
    finally:
        for node in nodes:
            node.send_signal(signal.SIGINT)
        for node in nodes:
            assert node.wait(timeout=30) == 0
            if node.stdout is not None:
                node.stdout.close()
