"""Several "hosts": network namespaces on a bridge, each with its own address (and, for
the StatefulSet, its own /etc/hosts). Needs root and iproute2 (CI runs as root).

- two worker nodes: a ref to an actor on host A is handed through the driver to host
  B, which then calls host A directly;
- four hosts: a driver and three workers that join it with ``--join`` over CURVE train
  a 3-stage pipeline to the unsharded model's gradients and parameters;
- the exact container command of deploy/kubernetes/statefulset.yaml on three hosts
  named like the StatefulSet's pods, trains the example GPT.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import shardline as sl
from shardline.transport import KeyPair

pytestmark = pytest.mark.anyio

SUBNET = "10.231.77"
ROOT = Path(__file__).resolve().parent.parent


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2 ('ip')"
    probe = f"slprobe{uuid.uuid4().hex[:6]}"
    try:
        _ip("netns", "add", probe)
    except (subprocess.CalledProcessError, OSError) as exc:
        return f"cannot create network namespaces here: {exc}"
    _ip("netns", "del", probe)
    return None


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


Hosts = Callable[..., list[str]]


@pytest.fixture
def make_hosts() -> Iterator[Hosts]:
    """``make_hosts(n, names=None)``: n namespaces on one bridge, host i at
    SUBNET.(10 + i); with ``names``, each namespace's /etc/hosts maps them all."""
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    made: list[str] = []
    bridges: list[str] = []

    def make(n: int, names: list[str] | None = None) -> list[str]:
        tag = uuid.uuid4().hex[:5]
        bridge, spaces = f"slbr{tag}", [f"slns{tag}{i}" for i in range(n)]
        bridges.append(bridge)
        _ip("link", "add", bridge, "type", "bridge")
        _ip("addr", "add", f"{SUBNET}.1/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        hosts = "".join(f"{SUBNET}.{10 + i} {' '.join(names_of(names[i]))}\n"
                        for i in range(n)) if names else ""
        for i, ns in enumerate(spaces):
            outside, inside = f"slv{tag}{i}", f"slp{tag}{i}"
            _ip("netns", "add", ns)
            made.append(ns)
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            _ip("link", "set", outside, "master", bridge)
            _ip("link", "set", outside, "up")
            _ip("link", "set", inside, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{SUBNET}.{10 + i}/24", "dev", inside)
            _ip("-n", ns, "link", "set", inside, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "route", "add", "default", "via", f"{SUBNET}.1")
            if names:
                # `ip netns exec` bind-mounts /etc/netns/NS/hosts over /etc/hosts
                etc = Path("/etc/netns") / ns
                etc.mkdir(parents=True, exist_ok=True)
                (etc / "hosts").write_text(f"127.0.0.1 localhost\n{hosts}")
        return spaces

    try:
        yield make
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        for bridge in bridges:
            subprocess.run(["ip", "link", "del", bridge], capture_output=True, timeout=30)


def names_of(pod: str) -> list[str]:
    """A StatefulSet pod's names: ``shardline-1`` and ``shardline-1.<service>``."""
    return [pod, f"{pod}.shardline"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SHARDLINE_", "SLURM_", "OMPI_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join(p or os.getcwd() for p in sys.path)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **extra}


def _in(ns: str, *cmd: str, **kwargs: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(["ip", "netns", "exec", ns, *cmd], text=True, **kwargs)


def _reap(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.communicate()


def _worker(ns: str) -> subprocess.Popen[str]:
    # 0.0.0.0 without keys needs --insecure: these hosts exist only inside this test.
    return _in(ns, sys.executable, "-m", "shardline.cli", "node", "--listen", "tcp://0.0.0.0:0",
               "--insecure", "--allow", "tests", stdout=subprocess.PIPE, env=_env())


async def test_ref_passed_between_hosts_through_the_driver(make_hosts: Hosts) -> None:
    procs = [_worker(ns) for ns in make_hosts(2)]
    try:
        addresses = []
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.startswith("shardline node "), line
            addresses.append(line.split()[2])
        # each advertises its own namespace's address, not 0.0.0.0
        assert addresses[0].startswith(f"tcp://{SUBNET}.10:")
        assert addresses[1].startswith(f"tcp://{SUBNET}.11:")
        async with sl.Node() as driver:
            a = await driver.connect(addresses[0])
            b = await driver.connect(addresses[1])
            counter = await a.spawn("tests.actors_fixtures:Counter", 100)
            relay = await b.spawn("tests.actors_fixtures:Echo")
            assert await relay.call(counter, "incr", 1) == 101   # host B -> host A
            assert addresses[0] in await relay.peers()
            assert await counter.get() == 101
    finally:
        _reap(procs)


@pytest.mark.timeout(240)
def test_four_hosts_join_over_curve_and_train_a_pipeline(make_hosts: Hosts,
                                                         tmp_path: Path) -> None:
    driver_ns, *worker_ns = make_hosts(4)
    driver_keys = KeyPair.write(tmp_path / "driver")
    KeyPair.write(tmp_path / "workers")   # one keypair for the workers: they call each other
    address = f"tcp://{SUBNET}.10:29555"
    result = tmp_path / "result"
    procs = [_in(driver_ns, sys.executable, "-m", "tests.cluster_fixtures", "pipeline",
                 "tcp://0.0.0.0:29555", str(tmp_path / "driver"),
                 str(tmp_path / "workers" / "node.key"), str(result),
                 stderr=subprocess.PIPE, env=_env(), cwd=ROOT)]
    procs += [_in(ns, sys.executable, "-m", "shardline.cli", "node", "--join", address,
                  "--server-key", driver_keys.public.decode(), "--keys",
                  str(tmp_path / "workers"), "--allow", "tests",
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), cwd=ROOT)
              for ns in worker_ns]
    try:
        _, err = procs[0].communicate(timeout=200)
        assert procs[0].returncode == 0, err[-4000:]
        ends = [p.communicate(timeout=30) for p in procs[1:]]
        assert [p.returncode for p in procs[1:]] == [0, 0, 0], ends
    finally:
        _reap(procs)
    # ranks 1..3, each on its own host: a pipeline stage per host
    seen = result.read_text().split()
    assert [s.split("@")[0] for s in seen] == ["1", "2", "3"]
    assert sorted(re.sub(r":\d+$", "", s.split("@")[1]) for s in seen) == [
        f"tcp://{SUBNET}.{10 + i}" for i in (1, 2, 3)]


def _manifest() -> dict[str, Any]:
    docs = list(yaml.safe_load_all((ROOT / "deploy/kubernetes/statefulset.yaml").read_text()))
    return next(d for d in docs if d and d.get("kind") == "StatefulSet")


@pytest.mark.timeout(300)
def test_the_statefulset_command_runs_across_hosts(make_hosts: Hosts,
                                                  tmp_path: Path) -> None:
    manifest = _manifest()
    replicas = manifest["spec"]["replicas"]
    pod = manifest["spec"]["template"]["spec"]
    container = pod["containers"][0]
    command, workdir = container["command"], container["workingDir"]
    name = manifest["metadata"]["name"]
    pods = [f"{name}-{i}" for i in range(replicas)]
    spaces = make_hosts(replicas, pods)

    # What the image and the pod give the container, under tmp_path instead of /:
    # train.py as the Dockerfile copies it into the working directory, the keys Secret
    # where the manifest mounts it.
    app = tmp_path / workdir.lstrip("/")
    app.mkdir(parents=True)
    dockerfile = (ROOT / "deploy/kubernetes/Dockerfile").read_text()
    assert f"WORKDIR {workdir}\n" in dockerfile
    into_app = dockerfile.rpartition(f"WORKDIR {workdir}\n")[2]
    copies = re.findall(r"^COPY (\S+) \./(\S+)$", into_app, re.M)
    assert copies
    for source, target in copies:
        shutil.copy(ROOT / source, app / target)
    mount = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "keys")
    KeyPair.write(tmp_path / mount.lstrip("/"))
    env = {e["name"]: e["value"] for e in container["env"]}

    # The manifest's command, as is; our own (small) training arguments.
    args = ["--steps", "2", "--dim", "32", "--blocks", "2", "--seq", "32", "--batch", "8",
            "--microbatches", "2", "--out", str(tmp_path / "checkpoint")]
    procs = [_in(ns, *command, *args, cwd=app, stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE, env=_env(**env, HOSTNAME=pods[i]))
             for i, ns in enumerate(spaces)]
    try:
        ends = [p.communicate(timeout=280) for p in procs]
    finally:
        _reap(procs)
    assert [p.returncode for p in procs] == [0] * replicas, [e[1][-3000:] for e in ends]
    out = ends[0][0]
    assert "loss" in out and (tmp_path / "checkpoint").is_dir(), out
    for i in range(1, replicas):   # rank i held a stage on its own host
        assert re.search(rf"stage on rank {i}: .* cpu", out), out
        assert f"as rank {i} of {replicas}" in ends[i][0]
