"""On a machine with CUDA: two ranks via ``shardline run``, each placing its stage on
``cuda:{local rank}`` (both on cuda:0 with one GPU); one training step's gradients
equal the CPU run's (1e-4). Skipped without CUDA."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from tests.test_cluster_run import launch, results

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from torch import nn
    import shardline as sl
    from shardline.models import LayerSpec, Pipeline
    from tests import models_fixtures

    CONFIG = {"kind": "mlp", "n": 4, "dim": 8}

    async def main() -> None:
        async with sl.Cluster.from_env(timeout=120) as cluster:
            worker = cluster.nodes[0]
            gpus = torch.cuda.device_count()
            here = f"cuda:{(cluster.launch.local_rank or 0) % gpus}"
            there = worker.devices[-1]
            pipe = await Pipeline.start(
                cluster.node, LayerSpec("tests.models_fixtures:layers", CONFIG, 4),
                placement=[here, (worker, there)], microbatches=2,
                loss_fn="torch.nn.functional:cross_entropy",
                optimizer=("torch.optim.SGD", {"lr": 1.0}))
            gen = torch.Generator().manual_seed(0)
            x, y = torch.randn(6, 8, generator=gen), torch.randint(0, 4, (6,), generator=gen)
            before = {k: v.clone() for k, v in (await pipe.state_dict()).items()}
            loss = await pipe.train_step(x, y)
            after = await pipe.state_dict()
            await pipe.stop()
        # the CPU run: with SGD at lr 1, before - after is the gradient
        ref = models_fixtures.layers(CONFIG, 0, 4)
        parts = torch.tensor_split(torch.arange(6), 2)
        ref_loss = sum(nn.functional.cross_entropy(ref(x[p]), y[p]) for p in parts) / 2
        ref_loss.backward()
        grads = dict(ref.named_parameters())
        diff = max(float(((before[k] - after[k]).cpu() - grads[k].grad).abs().max())
                   for k in grads)
        with open(sys.argv[1], "w") as f:
            json.dump({"devices": [here, there], "grad_diff": diff,
                       "loss": loss, "ref_loss": float(ref_loss.detach())}, f)

    sl.run(main())
""")


@pytest.mark.timeout(300)
def test_two_ranks_on_their_gpus_match_the_cpu_run(tmp_path: Path) -> None:
    script = tmp_path / "gpu.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out.json"
    ended = results(launch(2, script, str(out)), timeout=240)
    assert [code for code, _ in ended] == [0, 0], ended
    seen = json.loads(out.read_text())
    assert all(d.startswith("cuda:") for d in seen["devices"]), seen
    assert seen["grad_diff"] <= 1e-4, seen
    assert abs(seen["loss"] - seen["ref_loss"]) <= 1e-4, seen
