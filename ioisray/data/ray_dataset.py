"""The one place that turns in-memory image arrays into Ray Data datasets.

The arrays go to the object store once; the dataset is a lazy `range` of row numbers mapped to rows,
so Ray Train re-executes it every epoch. That re-execution is what class-balanced re-sampling uses to
draw a fresh sample each epoch, and what lets the IOIS loop mix in each epoch's synthetic images (see ioisray/synthesis/pool.py).
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import ray

ROWS_PER_BLOCK = 256


def _gather_rows(batch: dict, arrays: list, sampling: str, origin_columns: bool = False) -> dict:
    images, labels, by_class = ray.get(arrays[0])
    idx = batch["id"]
    if sampling == "class_balanced":
        # Each row draws a class uniformly, then an image of that class: every class is seen equally
        # often in expectation. Unseeded on purpose, so each epoch's execution draws a new sample.
        rng = np.random.default_rng()
        classes = rng.integers(len(by_class), size=len(idx))
        idx = np.array([by_class[c][rng.integers(len(by_class[c]))] for c in classes], dtype=np.int64)
    rows = {"image": images[idx], "label": labels[idx]}
    if origin_columns:  # the columns synthetic rows carry, so that both can share one stream
        n = len(idx)
        rows.update(seed=np.full(n, -1, np.int64), synthetic=np.zeros(n, np.int8),
                    plan_epoch=np.full(n, -1, np.int64))
    return rows


def to_ray_dataset(images: np.ndarray, labels: np.ndarray, *,
                   sampling: Literal["natural", "class_balanced", "ordered"] = "ordered",
                   seed: int = 0, num_cpus: float = 0.25, pad_rows: int = 0,
                   origin_columns: bool = False) -> "ray.data.Dataset":
    """A dataset of {"image": uint8 (H, W, 3), "label": int64} rows.

    "ordered" keeps row order (evaluation); "natural" fixes one seeded permutation so that every block
    mixes classes (the training loop adds a local shuffle buffer on top); "class_balanced" re-samples
    each epoch. Small `num_cpus` per read task: Ray Train's workers hold the rest, and a task waiting
    for a whole CPU would deadlock a small machine.

    `pad_rows` adds that many extra rows (seeded repeats or more draws; not for "ordered"): Ray Train splits a dataset
    equally over its workers by dropping the remainder, and padding the real part lets a caller make
    the total divisible so that no synthetic row is dropped. `origin_columns` adds the columns of
    synthetic rows (seed -1, synthetic 0, plan_epoch -1).
    """
    if pad_rows and sampling == "ordered":
        raise ValueError("pad_rows needs sampling='natural' or 'class_balanced'")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    labels = np.asarray(labels, dtype=np.int64)
    by_class = [np.flatnonzero(labels == c) for c in range(int(labels.max()) + 1)]
    by_class = [ix for ix in by_class if len(ix)]
    ref = ray.put((np.ascontiguousarray(images), labels, by_class))
    n = len(labels)
    ds = ray.data.range(n + pad_rows, override_num_blocks=max(1, min(64, (n + pad_rows) // ROWS_PER_BLOCK)))
    if sampling == "natural":
        rng = np.random.default_rng(seed)
        perm = np.concatenate([rng.permutation(n), rng.integers(n, size=pad_rows)])
        ds = ds.map_batches(lambda b: {"id": perm[b["id"]]}, num_cpus=num_cpus, batch_format="numpy")
    return ds.map_batches(_gather_rows, fn_kwargs={"arrays": [ref], "sampling": sampling,
                                                         "origin_columns": origin_columns},
                          num_cpus=num_cpus, batch_format="numpy")
