"""Where a process stands in a launched job: the launcher readers, their precedence,
Slurm host lists, local ranks and devices. Pure functions over an environment dict."""

from __future__ import annotations

import pytest

import shardline as sl
from shardline.actors._hostinfo import devices, gpu_count, local_rank_from_env, parse_info
from shardline.actors._launchers import DEFAULT_PORT, read_launch
from shardline.actors._launchers.hostlist import expand, first_host

TORCHRUN = {"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_ADDR": "10.1.0.5",
            "MASTER_PORT": "29500"}
SLURM = {"SLURM_PROCID": "3", "SLURM_NTASKS": "5", "SLURM_LOCALID": "1",
         "SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[07-09,12]",
         "SLURM_JOB_NODELIST": "login1,gpu[07-12]"}
MPI = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "3",
       "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "3"}
POD = {"HOSTNAME": "trainer-3", "SHARDLINE_SERVICE": "trainer-hl",
       "SHARDLINE_WORLD_SIZE": "4"}


def test_shardline_variables() -> None:
    launch = read_launch({"SHARDLINE_RANK": "1", "SHARDLINE_WORLD_SIZE": "3",
                          "SHARDLINE_HEAD": "tcp://10.0.0.1:6000"}, "box")
    assert (launch.rank, launch.world_size, launch.head) == (1, 3, "tcp://10.0.0.1:6000")
    assert launch.source == "SHARDLINE_RANK" and launch.local_rank is None
    # host:port, a bare host (the default port), an IPv6 head
    assert read_launch({"SHARDLINE_RANK": "0", "SHARDLINE_WORLD_SIZE": "1",
                        "SHARDLINE_HEAD": "head:7"}, "box").head == "tcp://head:7"
    assert read_launch({"SHARDLINE_RANK": "0", "SHARDLINE_WORLD_SIZE": "1",
                        "SHARDLINE_HEAD": "head"}, "box").head == f"tcp://head:{DEFAULT_PORT}"
    assert read_launch({"SHARDLINE_RANK": "0", "SHARDLINE_WORLD_SIZE": "1",
                        "SHARDLINE_HEAD": "[fd00::1]:9"}, "box").head == "tcp://[fd00::1]:9"


def test_torchrun_head_port_is_the_one_after_its_store() -> None:
    launch = read_launch(TORCHRUN, "box")
    assert (launch.rank, launch.world_size, launch.local_rank) == (2, 4, 0)
    assert launch.head == "tcp://10.1.0.5:29501" and launch.source == "torchrun"
    assert read_launch({**TORCHRUN, "SHARDLINE_PORT": "7000"}, "box").head_port == 7000


def test_slurm_first_host_of_the_step_and_a_port_from_the_job_id() -> None:
    launch = read_launch(SLURM, "box")
    assert (launch.rank, launch.world_size, launch.local_rank) == (3, 5, 1)
    assert launch.head == f"tcp://gpu07:{20000 + 4242 % 10000}"
    job_only = {k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"}
    assert read_launch(job_only, "box").head_host == "login1"
    assert read_launch({**SLURM, "SHARDLINE_PORT": "7001"}, "box").head_port == 7001


def test_open_mpi_on_one_host_and_across_hosts() -> None:
    launch = read_launch(MPI, "box")
    assert (launch.rank, launch.world_size, launch.local_rank) == (1, 3, 1)
    assert launch.head == f"tcp://127.0.0.1:{DEFAULT_PORT}"
    across = {**MPI, "OMPI_COMM_WORLD_LOCAL_SIZE": "1"}
    with pytest.raises(ValueError, match="SHARDLINE_HEAD"):
        read_launch(across, "box")
    assert read_launch({**across, "SHARDLINE_HEAD": "n1:5"}, "box").head == "tcp://n1:5"


def test_statefulset_ordinal() -> None:
    launch = read_launch({**POD, "SHARDLINE_PORT": "29555"}, "ignored")
    assert (launch.rank, launch.world_size, launch.local_rank) == (3, 4, 0)
    assert launch.head == "tcp://trainer-0.trainer-hl:29555"
    # the hostname when HOSTNAME is unset; the Service named after the set in Kubernetes
    pod = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "SHARDLINE_WORLD_SIZE": "2"}
    assert read_launch(pod, "shard-1").head_host == "shard-0.shard"
    # outside Kubernetes a hostname that merely ends in -N is no ordinal
    with pytest.raises(ValueError, match="rank"):
        read_launch({"SHARDLINE_WORLD_SIZE": "2"}, "laptop-1")
    with pytest.raises(ValueError, match="world size"):
        read_launch({k: v for k, v in POD.items() if k != "SHARDLINE_WORLD_SIZE"}, "x")


def test_precedence() -> None:
    everything = {**TORCHRUN, **SLURM, **MPI, **POD}
    assert read_launch(everything, "box").source == "torchrun"
    no_torchrun = {k: v for k, v in everything.items() if k not in TORCHRUN}
    assert read_launch(no_torchrun, "box").source == "Slurm"
    only_mpi_and_pod = {**MPI, **POD}
    assert read_launch(only_mpi_and_pod, "box").source == "Open MPI"
    # SHARDLINE_* win field by field over any launcher
    mixed = read_launch({**SLURM, "SHARDLINE_RANK": "0", "SHARDLINE_HEAD": "h:1"}, "box")
    assert (mixed.rank, mixed.world_size, mixed.head, mixed.source) == (
        0, 5, "tcp://h:1", "SHARDLINE_RANK")
    assert read_launch({**TORCHRUN, "SHARDLINE_LOCAL_RANK": "5"}, "box").local_rank == 5


@pytest.mark.parametrize("env, message", [
    ({}, "start every rank under torchrun"),
    ({"SHARDLINE_RANK": "x", "SHARDLINE_WORLD_SIZE": "2", "SHARDLINE_HEAD": "h"},
     "not an integer"),
    ({"SHARDLINE_RANK": "-1", "SHARDLINE_WORLD_SIZE": "2", "SHARDLINE_HEAD": "h"},
     "negative"),
    ({"SHARDLINE_RANK": "2", "SHARDLINE_WORLD_SIZE": "2", "SHARDLINE_HEAD": "h"},
     "does not fit"),
    ({"SHARDLINE_RANK": "0", "SHARDLINE_WORLD_SIZE": "2", "SHARDLINE_HEAD": "udp://h:1"},
     "SHARDLINE_HEAD"),
    ({"SHARDLINE_RANK": "0", "SHARDLINE_WORLD_SIZE": "2", "SHARDLINE_HEAD": "h:99999"},
     "port"),
])
def test_bad_environments_say_what_is_wrong(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        read_launch(env, "box")


def test_slurm_host_lists() -> None:
    assert expand("node[01-04,07]") == ["node01", "node02", "node03", "node04", "node07"]
    assert expand("a,b[1-2],c") == ["a", "b1", "b2", "c"]
    assert expand("rack[1-2]-n[9-10]") == ["rack1-n9", "rack1-n10", "rack2-n9", "rack2-n10"]
    assert expand("gpu[008-010]") == ["gpu008", "gpu009", "gpu010"]
    assert expand("solo") == ["solo"]
    assert first_host("node[01-04,07],login") == "node01"
    assert first_host("x-[3-5]-ib") == "x-3-ib"
    for bad in ("node[1-", "node]1[", "node[a-b]", "node[5-1]"):
        with pytest.raises(ValueError):
            expand(bad)


def test_local_rank_and_devices() -> None:
    assert local_rank_from_env({"SLURM_LOCALID": "2"}) == 2
    assert local_rank_from_env({"LOCAL_RANK": "1", "SLURM_LOCALID": "2"}) == 1
    assert local_rank_from_env({"OMPI_COMM_WORLD_LOCAL_RANK": "3"}) == 3
    assert local_rank_from_env({}) is None
    with pytest.raises(ValueError, match="LOCAL_RANK"):
        local_rank_from_env({"LOCAL_RANK": "one"})
    assert gpu_count({"CUDA_VISIBLE_DEVICES": "0,1,2"}) == 3
    assert gpu_count({"CUDA_VISIBLE_DEVICES": ""}) == 0
    assert gpu_count({"CUDA_VISIBLE_DEVICES": "1,-1,2"}) == 1   # CUDA stops at -1
    assert gpu_count({"CUDA_VISIBLE_DEVICES": "GPU-8a1b,MIG-77c"}) == 2
    assert devices(None, {"CUDA_VISIBLE_DEVICES": ""}) == ["cpu"]
    assert devices(None, {"CUDA_VISIBLE_DEVICES": "4,5"}) == ["cpu", "cuda:0", "cuda:1"]
    assert devices(3, {"CUDA_VISIBLE_DEVICES": "4,5"}) == ["cpu", "cuda:1"]
    assert devices(0, {"CUDA_VISIBLE_DEVICES": "7"}) == ["cpu", "cuda:0"]


def test_a_peer_self_description_is_checked_field_by_field() -> None:
    assert parse_info(None) == {"host": None, "pid": None, "rank": None, "local_rank": None,
                                "devices": ["cpu"]}
    info = parse_info({"host": "h", "pid": 7, "rank": True, "local_rank": -1,
                       "devices": ["cpu", 3, "cuda:0"]})
    assert info == {"host": "h", "pid": 7, "rank": None, "local_rank": None,
                    "devices": ["cpu", "cuda:0"]}


def test_from_env_refuses_other_ranks() -> None:
    with pytest.raises(RuntimeError, match="shardline run"):
        sl.Cluster.from_env(environ={"SHARDLINE_RANK": "1", "SHARDLINE_WORLD_SIZE": "2",
                                     "SHARDLINE_HEAD": "127.0.0.1:1"})
    cluster = sl.Cluster.from_env(environ={"SHARDLINE_RANK": "0", "SHARDLINE_WORLD_SIZE": "3",
                                           "SHARDLINE_HEAD": "127.0.0.1:6123"})
    assert cluster.expect == 2 and cluster.node.listen == "tcp://127.0.0.1:6123"
    assert cluster.launch is not None and cluster.launch.rank == 0
