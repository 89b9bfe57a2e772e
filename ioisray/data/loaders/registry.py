"""The loader registry and `load_dataset`, which dispatches through it.

A loader is any function `load(root, *, <options>) -> ImageDataset` registered under a dataset
name. Its signature says what it needs: `load_dataset` passes it only the keyword-only options it
declares, and a `root` without a default means the dataset cannot be loaded without one. So a new
layout is one decorated function, and `load_dataset` never names a dataset.
"""
from __future__ import annotations

import inspect
from typing import Callable

from ..base import DataError, ImageDataset, check_on_bad_image

Loader = Callable[..., ImageDataset]

# Dataset name -> loader; filled by the @register decorators of the loader modules.
LOADERS: dict[str, Loader] = {}


def register(name: str) -> Callable[[Loader], Loader]:
    """Decorator: make `load_dataset(name, ...)` call the decorated loader."""
    def add(load: Loader) -> Loader:
        LOADERS[name] = load
        return load
    return add


def _options_taken(load: Loader) -> set[str]:
    params = inspect.signature(load).parameters.values()
    return {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _needs_root(load: Loader) -> bool:
    root = next(iter(inspect.signature(load).parameters.values()))
    return root.default is inspect.Parameter.empty


def load_dataset(name: str, root: str | None = None, *, image_size: int, csv: str | None = None,
                 on_bad_image: str = "error", imbalance_ratio: float = 50.0, seed: int = 0,
                 num_threads: int = 4, allow_outside_root: bool = False) -> ImageDataset:
    """Load dataset `name` (a key of LOADERS); options a loader does not use are ignored."""
    load = LOADERS.get(name)
    if load is None:
        raise DataError(f"unknown dataset {name!r}; known: {sorted(LOADERS)}")
    check_on_bad_image(on_bad_image)  # validate up front, even for loaders that read no files
    if root is None and _needs_root(load):
        raise DataError(f"dataset {name!r} needs a root directory")
    options = dict(image_size=image_size, csv=csv, on_bad_image=on_bad_image,
                   imbalance_ratio=imbalance_ratio, seed=seed, num_threads=num_threads,
                   allow_outside_root=allow_outside_root)
    taken = _options_taken(load)
    return load(root, **{k: v for k, v in options.items() if k in taken})
