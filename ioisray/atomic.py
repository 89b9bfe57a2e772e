"""Atomic file writes: write a temporary file in the target folder, fsync, then rename over the target.

A crash or a full disk therefore never leaves a half-written checkpoint or results file, and the
previous version stays intact until the new one is complete. The result has the mode `open()` would
give it under the user's umask (tempfile's own 0600/0700 would hide a run from the user's colleagues).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, IO


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask sets it, which races with other threads)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def temporary_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A new folder in `parent` to fill and then rename into place, with the umask's mode."""
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    tmp.chmod(0o777 & ~_umask())
    return tmp


def _atomic_write(path: str | os.PathLike, write: Callable[[IO], None], mode: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:  # a full disk says nothing of where
            raise OSError(e.errno, e.strerror, str(path)) from None
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
