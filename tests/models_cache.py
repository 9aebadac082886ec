"""Model directories as EXO downloads them, made on the fly for tests and the benchmark."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file


def write_shard(path: Path, tensors: dict[str, int], *, fill: int = 0) -> None:
    """A valid safetensors file of float32 tensors ``name -> element count``."""
    save_file({name: np.full(n, fill, dtype=np.float32) for name, n in tensors.items()}, path)


def make_model(root: Path, name: str = "mlx-community--Tiny-4bit", shards: int = 2) -> Path:
    """A sharded model directory with config.json, an index and ``shards`` safetensors files."""
    directory = root / name
    directory.mkdir(parents=True)
    (directory / "config.json").write_text('{"model_type": "llama"}\n')
    weight_map: dict[str, str] = {}
    for i in range(shards):
        file_name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {f"layers.{i}.weight": 64, f"layers.{i}.bias": 8}
        write_shard(directory / file_name, tensors)
        weight_map.update(dict.fromkeys(tensors, file_name))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


def truncate(path: Path, by: int = 16) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-by])


def garble_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:12] = b"\xff{[\x00"
    path.write_bytes(bytes(data))
