"""Which images a diffusion model was trained on, so that no run samples from a generator that has seen
its validation or test images.

Pretraining records its training split in the model folder (`training_images.json`: one short hash
per image of the source path relative to `data.root`, so the record survives moving the dataset
folder). A run that uses the model checks its own validation and test images against that record.
Another seed, split fraction, CSV or data folder changes the split, and a generator shared across
such runs would otherwise hand the classifier near-copies of its held-out images.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import numpy as np

from ioisray.atomic import atomic_write_text
from ioisray.data.base import ImageDataset

TRAINING_IMAGES_FILE = "training_images.json"


def image_keys(ds: ImageDataset, rows: np.ndarray, root: Optional[str]) -> list[str]:
    """Sorted ids of `rows`: 16 hex digits of the SHA-1 of each source path (relative to `root`)."""
    base = os.path.abspath(root) if root else None

    def rel(src: str) -> str:
        return os.path.relpath(os.path.abspath(src), base).replace(os.sep, "/") if base else src

    return sorted(hashlib.sha1(rel(ds.sources[i]).encode()).hexdigest()[:16] for i in np.asarray(rows))


def split_id(train_keys: list[str]) -> str:
    """8 hex digits naming a training split: the same images give the same id."""
    return hashlib.sha1("\n".join(train_keys).encode()).hexdigest()[:8]


def write_training_images(model_dir: str | os.PathLike, data_name: str, train_keys: list[str]) -> None:
    atomic_write_text(Path(model_dir) / TRAINING_IMAGES_FILE,
                      json.dumps({"data": data_name, "split_id": split_id(train_keys), "images": train_keys}))


def training_images(model_dir: str | os.PathLike) -> Optional[set[str]]:
    """The image ids recorded in `model_dir` (a local folder); None when it has no record (a model from
    elsewhere, or one pretrained before records were kept)."""
    path = Path(model_dir) / TRAINING_IMAGES_FILE
    if not path.is_file():
        return None
    try:
        return set(json.loads(path.read_text())["images"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a training-image record: {e}") from None


def held_out_seen(model_dir: str | os.PathLike, held_out_keys: list[str]) -> Optional[int]:
    """How many of `held_out_keys` the model in `model_dir` was trained on; None without a record."""
    seen = training_images(model_dir)
    return None if seen is None else sum(k in seen for k in held_out_keys)
