"""Checkpoints: safetensors for every tensor (model and optimizer), JSON for the rest.

Files are keyed by the unsharded model's names, so a checkpoint loads into any split.
Each file is written to a temporary name, flushed and renamed into place; the
manifest goes last, so a crash mid-save leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
import torch
from safetensors.torch import load_file, save_file

from ._spec import LayerSpec

if TYPE_CHECKING:
    from ._pipeline import Pipeline

__all__ = ["checkpoint_spec", "load_checkpoint", "save_checkpoint"]

MANIFEST = "shardline.json"


def _atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


async def save_checkpoint(pipe: Pipeline, directory: str | os.PathLike[str]) -> None:
    path = Path(directory)
    model = await pipe.state_dict()
    opt_tensors: dict[str, torch.Tensor] = {}
    groups: list[list[dict[str, Any]]] = []
    for ref in pipe.devices:
        state = await ref.optimizer_state()
        opt_tensors.update(state["tensors"])
        groups.append(state["groups"])
    manifest: dict[str, Any] = {"format": 1, "schedule": pipe.schedule.name,
                                "devices": pipe.schedule.n_devices,
                                "optimizer_groups": groups}
    if pipe.model_spec is not None:
        # how to build the model again (e.g. `shardline serve --model gpt:DIR`); its
        # weights are this checkpoint's, not whatever the spec was started from
        manifest["model"] = {**pipe.model_spec.to_wire(), "weights": None}

    def write() -> None:
        path.mkdir(parents=True, exist_ok=True)
        _atomic(path / "model.safetensors",
                lambda p: save_file({k: v.contiguous() for k, v in model.items()}, str(p)))
        _atomic(path / "optimizer.safetensors",
                lambda p: save_file({k: v.contiguous() for k, v in opt_tensors.items()},
                                    str(p)))
        _atomic(path / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=1)))

    await anyio.to_thread.run_sync(write)


def checkpoint_spec(directory: str | os.PathLike[str]) -> LayerSpec:
    """The ``LayerSpec`` a checkpoint was saved from, reading its weights."""
    path = Path(directory)
    manifest = json.loads((path / MANIFEST).read_text())
    if "model" not in manifest:
        raise ValueError(f"{path} does not say how to build its model (saved from a "
                         "pipeline of an nn.Module rather than a LayerSpec)")
    return LayerSpec.from_wire({**manifest["model"],
                                "weights": str((path / "model.safetensors").resolve())})


def _read(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    manifest = json.loads((path / MANIFEST).read_text())
    return (manifest, load_file(str(path / "model.safetensors")),
            load_file(str(path / "optimizer.safetensors")))


async def load_checkpoint(pipe: Pipeline, directory: str | os.PathLike[str]) -> None:
    manifest, model, opt_tensors = await anyio.to_thread.run_sync(_read, Path(directory))
    groups = manifest.get("optimizer_groups") or []
    for r in range(pipe.replicas):
        for d, ref in enumerate(pipe.replica_devices(r)):
            await ref.load_state_dict(model)
            mine = groups[d] if d < len(groups) else (groups[0] if groups else [])
            await ref.load_optimizer_state(opt_tensors, mine)
    await pipe.scheduler.resnapshot()
