"""Reads an HF folder's safetensors checkpoint (one file or shards)."""
from __future__ import annotations

import glob
import json
import os
from typing import Iterator, Tuple

import torch


def checkpoint_files(model_dir: str) -> list:
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(model_dir, s) for s in shards]
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir} (only safetensors checkpoints are supported)")
    return files


def iterate_weights(model_dir: str, lazy: bool = False) -> Iterator[Tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of every checkpoint tensor. ``lazy``: ``LazySlice`` objects instead, which read
    from the file only the part a tensor-parallel rank narrows them to (use each before the next)."""
    from safetensors import safe_open

    for path in checkpoint_files(model_dir):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, LazySlice(f.get_slice(name)) if lazy else f.get_tensor(name)


class LazySlice:
    """A checkpoint tensor not read yet: ``narrow`` reads only its slice, ``materialize`` all of it."""

    def __init__(self, file_slice):
        self._slice = file_slice
        self.shape = torch.Size(file_slice.get_shape())

    def dim(self) -> int:
        return len(self.shape)

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        index = tuple([slice(None)] * dim + [slice(start, start + length)])
        return self._slice[index]

    def materialize(self) -> torch.Tensor:
        return self._slice[tuple(slice(None) for _ in self.shape)] if self.shape else self._slice[...]
