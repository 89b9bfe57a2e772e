"""The one place that turns in-memory image arrays into Ray Data datasets.

The arrays go to the object store once, the images in blocks of consecutive rows (`StoredRows`), so a
read task fetches the blocks that hold its rows rather than every image; the dataset is a lazy `range`
of row numbers mapped to rows,
so Ray Train re-executes it every epoch. That re-execution is what lets each epoch read the training
rows in a new order (seeded by run and epoch, which an EpochCounter actor tells the read tasks) and
class-balanced re-sampling draw a fresh sample. The IOIS stream (ioisray/synthesis/stream.py) reads real
rows with the same `put_arrays` / `row_order` / `gather_rows`.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import ray

ROWS_PER_BLOCK = 256
# Bytes of images per object in the store: a read task fetches only the blocks holding its rows (from
# another node, or back from disk when spilled) instead of every image of the split (about 1 GB for
# HAM10000's training split at 224 px), and the store can spill or evict a block at a time.
STORED_BLOCK_BYTES = 64 * 2**20
Sampling = Literal["natural", "class_balanced", "ordered"]


@dataclass(frozen=True)
class StoredRows:
    """Arrays in the object store: the images as blocks of `rows_per_block` consecutive rows (one ref
    each), and the labels with the row ids of each class (one small ref). Picklable: the refs travel
    with it unresolved."""

    blocks: tuple  # ObjectRef of uint8 (rows_per_block, H, W, 3), the last one shorter
    rows_per_block: int
    index: "ray.ObjectRef"  # (labels int64 (n,), [row ids of each class present])
    image_shape: tuple
    image_dtype: str


def put_arrays(images: np.ndarray, labels: np.ndarray, block_bytes: int | None = None) -> StoredRows:
    """Images (in blocks of about `block_bytes`, default STORED_BLOCK_BYTES), labels and row indices per
    class in the object store, once."""
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    labels = np.asarray(labels, dtype=np.int64)
    by_class = [np.flatnonzero(labels == c) for c in range(int(labels.max()) + 1)]
    row_bytes = max(1, images[0].nbytes if len(images) else 1)
    rows = max(1, (block_bytes or STORED_BLOCK_BYTES) // row_bytes)
    blocks = tuple(ray.put(np.ascontiguousarray(images[s:s + rows])) for s in range(0, len(images), rows))
    return StoredRows(blocks, rows, ray.put((labels, [ix for ix in by_class if len(ix)])),
                      tuple(images.shape[1:]), images.dtype.str)


class EpochCounter:
    """The training epoch, for read tasks (a 0-CPU actor): rank 0 sets it before the epoch's stream
    starts (Ray Data starts an epoch only once every worker asks for it), read tasks ask for it."""

    def __init__(self):
        self.epoch = 0

    def set(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def get(self) -> int:
        return self.epoch


def start_epoch_counter():
    return ray.remote(EpochCounter).options(num_cpus=0, scheduling_strategy="DEFAULT").remote()


def current_epoch(counter) -> int:
    return 0 if counter is None else ray.get(counter.get.remote())


def set_epoch(counter, epoch: int) -> None:
    """Tell the read tasks which epoch's order to read (rank 0, before the epoch's stream starts)."""
    ray.get(counter.set.remote(epoch))


@contextlib.contextmanager
def epoch_counter_service():
    """{"epoch_counter": an EpochCounter} for the length of a run (a `fit` service), then removed."""
    counter = start_epoch_counter()
    try:
        yield {"epoch_counter": counter}
    finally:
        ray.kill(counter)


def train_read_runtime_env() -> dict:
    """The runtime environment of the tasks Ray Data starts for Ray Train's datasets: Ray Train (V2)
    gives its controller these environment variables (ray/train/v2/api/data_parallel_trainer.py), and
    what the controller starts inherits them: its DatasetManager, the split coordinator that actor
    makes, and the coordinator's read tasks."""
    try:
        from ray.train.v2._internal.constants import (DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE,
                                                      RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR,
                                                      get_env_vars_to_propagate)
    except ImportError:  # another Ray: prestarted workers may then go unused, nothing worse
        return {}
    env_vars = get_env_vars_to_propagate()
    env_vars.setdefault(RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR, DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE)
    return {"env_vars": env_vars}


def _import_and_wait(modules: tuple[str, ...], seconds: float) -> int:
    for module in ("ray.data", *modules):
        importlib.import_module(module)
    time.sleep(seconds)  # held, so that the other prestart tasks get processes of their own
    return os.getpid()


def prestart_read_workers(count: int, modules: tuple[str, ...] = ()) -> list:
    """Start `count` idle worker processes for the read tasks of Ray Train's datasets, with Ray Data
    and `modules` imported; returns at once (the tasks' refs, each giving its pid).

    Why: the first execution of a dataset otherwise starts its read tasks' processes itself, two at a
    time, each importing Ray Data while the others do, on the CPUs the epoch uses: on 2 cores, the 8
    read tasks of the IOIS stream began about 13 s after it did. Ray gives a task an idle worker only
    of the same runtime environment, hence `train_read_runtime_env`. (This module is light: the
    workers do not import torch.) Meant for a Ray that keeps idle workers, as the one ioisray starts
    does (recipes/launch.init_ray: 60 s); with Ray's defaults they may be reaped before they are used."""
    task = ray.remote(_import_and_wait).options(num_cpus=0, runtime_env=train_read_runtime_env(),
                                                scheduling_strategy="SPREAD", max_retries=0)
    return [task.remote(tuple(modules), 1.0) for _ in range(count)]


def row_order(n: int, sampling: Sampling, seed: int, extra_rows: int = 0, epoch: int = 0) -> np.ndarray | None:
    """The row ids an epoch reads (None: ids as they come). "natural" draws a permutation seeded by
    run and epoch, as a shuffling DataLoader does, so no local shuffle buffer is needed and every block
    mixes classes; `extra_rows` seeded repeats are appended to it."""
    if sampling != "natural":
        return None
    rng = np.random.default_rng([seed, epoch])
    return np.concatenate([rng.permutation(n), rng.integers(n, size=extra_rows)])


def gather_rows(stored: StoredRows, ids: np.ndarray, sampling: Sampling) -> dict:
    """{"image", "label"} of rows `ids`, fetching only the image blocks that hold them; class-balanced
    sampling draws its rows instead."""
    labels, by_class = ray.get(stored.index)
    ids = np.asarray(ids, dtype=np.int64)
    if sampling == "class_balanced":
        # Each row draws a class uniformly, then an image of that class: every class is seen equally
        # often in expectation. Unseeded on purpose, so each epoch's execution draws a new sample.
        rng = np.random.default_rng()
        classes = rng.integers(len(by_class), size=len(ids))
        ids = np.array([by_class[c][rng.integers(len(by_class[c]))] for c in classes], dtype=np.int64)
    block_of = ids // stored.rows_per_block
    needed = np.unique(block_of)
    images = np.empty((len(ids), *stored.image_shape), dtype=np.dtype(stored.image_dtype))
    for b, block in zip(needed, ray.get([stored.blocks[b] for b in needed])):
        rows = block_of == b
        images[rows] = block[ids[rows] - b * stored.rows_per_block]
    return {"image": images, "label": labels[ids]}


def _gather_batch(batch: dict, stored: StoredRows, sampling: str) -> dict:
    return gather_rows(stored, batch["id"], sampling)


def _epoch_ids(batch: dict, n: int, seed: int, counter) -> dict:
    return {"id": row_order(n, "natural", seed, epoch=current_epoch(counter))[batch["id"]]}


def to_ray_dataset(images: np.ndarray, labels: np.ndarray, *, sampling: Sampling = "ordered",
                   seed: int = 0, epoch_counter=None, num_cpus: float = 0.25) -> "ray.data.Dataset":
    """A dataset of {"image": uint8 (H, W, 3), "label": int64} rows.

    "ordered" keeps row order (evaluation); "natural" reads a permutation seeded by `seed` and the
    epoch `epoch_counter` holds (epoch 0 without one); "class_balanced" re-samples each epoch. Small
    `num_cpus` per read task: Ray Train's workers hold the rest, and a task waiting for a whole CPU
    would deadlock a small machine.
    """
    stored = put_arrays(images, labels)
    n = len(labels)
    ds = ray.data.range(n, override_num_blocks=max(1, min(64, n // ROWS_PER_BLOCK)))
    if sampling == "natural":
        ds = ds.map_batches(_epoch_ids, fn_kwargs={"n": n, "seed": seed, "counter": epoch_counter},
                            num_cpus=num_cpus, batch_format="numpy")
    ds = ds.map_batches(_gather_batch, fn_kwargs={"stored": stored, "sampling": sampling},
                        num_cpus=num_cpus, batch_format="numpy")
    if sampling == "ordered":
        keep_order(ds)
    return ds


def keep_order(ds: "ray.data.Dataset") -> None:
    """Blocks of `ds` leave in order, not as their read tasks finish (Ray Data's default), so that row i
    of an evaluation's predictions is row i of its split (in the driver's process, and in Ray Train's
    workers, which read the datasets they do not split with the datasets' own options:
    recipes/launch.train_data_config)."""
    import copy

    options = copy.deepcopy(ds.context.execution_options)  # this dataset's own, not the process's
    options.preserve_order = True
    ds.context.execution_options = options
