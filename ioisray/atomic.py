"""Atomic file writes: write a temporary file in the target folder, fsync, then rename over the target.

A crash or a full disk therefore never leaves a half-written checkpoint or results file, and the
previous version stays intact until the new one is complete.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, IO


def _atomic_write(path: str | os.PathLike, write: Callable[[IO], None], mode: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    _atomic_write(path, lambda f: f.write(text), "w")


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    import torch

    _atomic_write(path, lambda f: torch.save(obj, f), "wb")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    _atomic_write(path, lambda f: f.write(data), "wb")


def atomic_save_safetensors(tensors: dict, path: str | os.PathLike) -> None:
    from safetensors.torch import save

    atomic_write_bytes(path, save({k: v.contiguous() for k, v in tensors.items()}))
