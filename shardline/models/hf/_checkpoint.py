"""A local Hugging Face checkpoint directory: its config and where each tensor lives.

Reading is by name: a stage asks for the tensors of its own layers and only the
safetensors files holding them are opened (a sharded checkpoint's
``model.safetensors.index.json`` says which file holds which name).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..._errors import ShardlineError

__all__ = ["Checkpoint", "CheckpointError"]

log = logging.getLogger("shardline.models.hf")

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


class CheckpointError(ShardlineError, ValueError):
    """The directory is not a checkpoint this loader can read (missing files or tensors,
    a model family it does not know)."""


class Checkpoint:
    """``config.json`` (+ ``generation_config.json``) and the tensor names of a checkpoint
    directory. ``read(names)`` loads exactly those tensors."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        config_file = self.directory / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{self.directory} has no config.json: not a Hugging Face "
                                  "checkpoint directory")
        self.config: dict[str, Any] = _read_json(config_file)
        generation = self.directory / "generation_config.json"
        self.generation: dict[str, Any] = _read_json(generation) if generation.is_file() else {}
        self._where: dict[str, str] = self._locate()

    def _locate(self) -> dict[str, str]:
        """Tensor name -> file name, from the index or from the single file's header."""
        index = self.directory / INDEX
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index} has no weight_map")
            return {str(k): str(v) for k, v in weight_map.items()}
        single = self.directory / SINGLE
        if not single.is_file():
            raise CheckpointError(f"{self.directory} has neither {SINGLE} nor {INDEX} "
                                  "(only safetensors checkpoints are read)")
        with safe_open(str(single), framework="pt") as f:  # reads the header only
            return dict.fromkeys(f.keys(), SINGLE)

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self._where)

    def has(self, name: str) -> bool:
        return name in self._where

    @property
    def eos_token_id(self) -> int | list[int] | None:
        """What generation stops at: ``generation_config.json`` first, as transformers."""
        for source in (self.generation, self.config):
            eos = source.get("eos_token_id")
            if isinstance(eos, int):
                return eos
            if isinstance(eos, list) and eos:
                return [int(e) for e in eos]
        return None

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The named tensors, opening only the files that hold them."""
        wanted = sorted(set(names))
        missing = [n for n in wanted if n not in self._where]
        if missing:
            raise CheckpointError(f"{self.directory} lacks {len(missing)} tensors, "
                                  f"e.g. {missing[:3]}")
        by_file: dict[str, list[str]] = {}
        for name in wanted:
            by_file.setdefault(self._where[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for file, file_names in sorted(by_file.items()):
            with safe_open(str(self.directory / file), framework="pt") as f:
                for name in file_names:
                    out[name] = f.get_tensor(name)
        log.debug("read %d tensors from %s", len(out), ", ".join(sorted(by_file)))
        return out


def _read_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return data
