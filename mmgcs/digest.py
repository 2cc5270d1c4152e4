"""The one home of the project's content digests: a set of named tensors (a tower's weights in a feature-cache key,
the frozen weights a checkpoint leaves out, the weights every process must share) and a file's bytes (a checkpoint's
manifest). Their framing is stored on disk, in cache keys and in checkpoints: changing it orphans both."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable, Mapping

import torch


def tensors_digest(tensors: Mapping[str, torch.Tensor], new_hash: Callable[[], Any] = hashlib.sha256) -> str:
    """Each tensor's name, dtype, shape and bytes, in name order, through a fresh ``new_hash()`` (SHA-256 unless
    given): equal exactly when the names, dtypes, shapes and values are, whatever device the tensors are on."""
    digest = new_hash()
    for name in sorted(tensors):
        tensor = tensors[name]
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        if flat.numel():
            digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks (a checkpoint's optimizer file may be GBs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
