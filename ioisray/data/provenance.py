"""Which images a diffusion model was trained on, so that no run samples from a generator that has seen
its validation or test images.

Pretraining records its training split in the model folder (`training_images.json`: one short hash
per image of the source path relative to the data folder, so the record survives moving the
dataset folder). A run that uses the model checks its own validation and test images against that record.
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


def data_folder(data) -> Optional[str]:
    """The folder image paths are taken relative to, for a DataConfig: `data.root` (the folder of a
    root that is a file, such as a MedMNIST .npz), else the folder of `data.csv`; None for digits."""
    path = data.root or (os.path.dirname(os.path.abspath(data.csv)) if data.csv else None)
    return os.path.dirname(os.path.abspath(path)) if path and os.path.isfile(path) else path


def relative_paths(sources: list[str], folder: Optional[str]) -> list[str]:
    """Each source path relative to `folder` (see data_folder), with "/" separators; as they are
    without a folder (the embedded digits' "sklearn-digits[i]")."""
    base = os.path.abspath(folder) if folder else None
    return [os.path.relpath(os.path.abspath(s), base).replace(os.sep, "/") if base else s for s in sources]


def image_keys(ds: ImageDataset, rows: np.ndarray, folder: Optional[str]) -> list[str]:
    """Sorted ids of `rows`: 16 hex digits of the SHA-1 of each source path relative to `folder`
    (see data_folder), so that they do not change with the working directory or a moved dataset."""
    paths = relative_paths([ds.sources[i] for i in np.asarray(rows)], folder)
    return sorted(hashlib.sha1(p.encode()).hexdigest()[:16] for p in paths)


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


def check_record(model_dir: str | os.PathLike, train_keys: list[str], held_out_keys: list[str]) -> Optional[str]:
    """Whether the model in `model_dir` (a local folder) may serve a run with these training and
    held-out images: None if so; otherwise why not, or (prefixed "warning: ") why it cannot be told."""
    seen = training_images(model_dir)
    if seen is None:
        return (f"warning: {model_dir} has no {TRAINING_IMAGES_FILE} (not pretrained by this version of "
                f"ioisray), so it cannot be checked for this run's validation and test images")
    leaked = sum(k in seen for k in held_out_keys)
    if leaked:
        return f"{model_dir} was trained on {leaked} of this run's {len(held_out_keys)} validation and test images"
    if not any(k in seen for k in train_keys):
        return (f"warning: {model_dir} was trained on none of this run's images as they are named here (another "
                f"dataset, or the same images in another layout or folder?), so its record cannot vouch that "
                f"it has not seen this run's validation and test images")
    return None
