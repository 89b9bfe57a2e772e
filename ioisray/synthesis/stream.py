"""The Ray Data stream of one epoch's training rows: every real training row, plus the synthesis pool's
chunks as they are made (ioisray/synthesis/pool.py), with the pacing that keeps the chunks from queuing
behind the real rows.

Ray Train re-executes the dataset every epoch, so each execution reads that epoch's plan, and Ray Data
streams the blocks (with backpressure and equal splitting) into the workers' shards as they come.
"""
from __future__ import annotations

import functools
from typing import Optional

import numpy as np
import ray
from ray.data.block import BlockAccessor, BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from ioisray.synthesis.pool import RECOVERABLE, SynthesisPool


def _synthetic_rows(pool: SynthesisPool, i: int, max_retries: int) -> dict:
    failed = None
    for _ in range(max_retries + 2):
        _, (ref,) = ray.get(pool.coordinator.chunk.remote(i, failed))  # raises once retries are used up
        try:
            return ray.get(ref)
        except RECOVERABLE:
            failed = ref.hex()  # its actor is gone: the pool makes the chunk again
    raise RuntimeError(f"synthesis chunk {i}: no result after {max_retries + 1} attempts")


def _real_rows(real: dict, i: int, num_tasks: int) -> dict:
    from ioisray.data.ray_dataset import current_epoch, gather_rows, row_order

    ids = np.arange(i, real["rows"], num_tasks)  # task i reads every num_tasks-th row of the order
    order = row_order(real["images"], real["sampling"], real["seed"], real["rows"] - real["images"],
                      current_epoch(real["epoch_counter"]))  # this epoch's
    if order is not None:
        ids = order[ids]
    rows = gather_rows(real["stored"], ids, real["sampling"])
    n = len(ids)  # the columns synthetic rows carry, so that both share one stream
    rows.update(seed=np.full(n, -1, np.int64), synthetic=np.zeros(n, np.int8), plan_epoch=np.full(n, -1, np.int64))
    return rows


def _read_real(real: dict, i: int, num_slices: int, pool=None, after_chunk: Optional[int] = None):
    if after_chunk is not None:
        # Pacing: wait until chunk `after_chunk` is made (or failed: its own read task regenerates it),
        # so that real rows cannot queue up in the shards ahead of the synthetic ones.
        _, (ref,) = ray.get(pool.coordinator.chunk.remote(after_chunk))
        ray.wait([ref], fetch_local=False)
    yield BlockAccessor.batch_to_block(_real_rows(real, i, num_slices))


def _read_chunk(pool: SynthesisPool, i: int, max_retries: int):
    rows = _synthetic_rows(pool, i, max_retries)
    # A chunk synthesis.filter emptied yields no block: Ray Data would store an empty image column as
    # pickled objects, another type than the other blocks'.
    if len(rows["label"]):
        yield BlockAccessor.batch_to_block(rows)


def stream_order(num_chunks: int, num_slices: int, head: int) -> list[tuple[str, int, Optional[int]]]:
    """The read tasks of one epoch, in the order Ray Data starts them: ("real", slice, chunk it waits
    for, or None) and ("chunk", i, i). The first `head` real slices wait for nothing; each chunk is
    followed by its even share of the other slices, which wait for it. The last of several chunks
    releases none, so the real rows are all out before synthesis ends."""
    paced, releasing = max(num_slices - head, 1), max(num_chunks - 1, 1)
    released: list[list[int]] = [[] for _ in range(num_chunks)]
    for j in range(head, num_slices):
        released[(j - head) * releasing // paced].append(j)
    order: list[tuple[str, int, Optional[int]]] = [("real", j, None) for j in range(head)]
    for i in range(num_chunks):
        order += [("chunk", i, i)] + [("real", j, i) for j in released[i]]
    return order


class EpochStreamDatasource(Datasource):
    """One epoch of training data: the real training rows and the pool's current chunks, interleaved.

    A fixed set of read tasks for a fixed per-epoch budget: one per chunk (it waits for the chunk) and,
    with real rows, one per slice of them (`real["slice_rows"]` rows, or one slice per chunk). Ray Data
    starts tasks in order (a few at a time), so synthetic chunks join the stream as they are made,
    spread over the epoch. Real reads are paced by synthesis (see stream_order): only the first
    slices, `real["ahead"]` rows (what the workers take in before their first batch), are read at once,
    and the others as the chunks are made. Unpaced, every real row would be read in the first second
    and queue in the shards ahead of the first chunk. Slices of about a batch keep each worker's queue
    of real rows short, and Ray's equal split, which holds a block back until later ones cover it,
    holds back little. (Real rows and a chunk are separate tasks because Ray Data merges the blocks one
    task yields, which would hold the real slice back until its chunk is ready.)
    """

    def __init__(self, pool, chunk_sizes: list[int], image_shape: tuple[int, int, int],
                 real: Optional[dict] = None, max_retries: int = 3):
        super().__init__()
        self._pool, self._sizes, self._shape, self._real, self._retries = pool, chunk_sizes, image_shape, real, \
            max_retries

    def estimate_inmemory_data_size(self) -> int:
        return int((sum(self._sizes) + (self._real["rows"] if self._real else 0)) * np.prod(self._shape))

    def _task(self, read_fn, rows: int) -> ReadTask:
        return ReadTask(read_fn, BlockMetadata(num_rows=rows, size_bytes=int(rows * np.prod(self._shape)),
                                               input_files=None, exec_stats=None))

    def _slices(self) -> tuple[int, int]:
        """(real slices, how many of them are read at once: enough to hold `real["ahead"]` rows, at least
        one; None: all)."""
        rows, k, per_slice = self._real["rows"], len(self._sizes), self._real["slice_rows"]
        num = min(rows, max(k, -(-rows // per_slice)) if per_slice else k)
        if self._real["ahead"] is None:
            return num, num
        return num, min(num, max(1, -(-self._real["ahead"] // max(1, rows // num))))

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        # The same tasks whatever the requested parallelism: chunk i is always read by the same task.
        num, head = self._slices() if self._real else (0, 0)
        tasks = []
        for kind, i, after in stream_order(len(self._sizes), num, head):
            if kind == "chunk":
                tasks.append(self._task(functools.partial(_read_chunk, self._pool, i, self._retries), self._sizes[i]))
            else:
                tasks.append(self._task(functools.partial(_read_real, self._real, i, num, self._pool, after),
                                        len(range(i, self._real["rows"], num))))
        return tasks


def epoch_stream_source(pool: SynthesisPool, chunk_sizes: list[int], image_shape: tuple[int, int, int], *,
                        real_images: Optional[np.ndarray] = None, real_labels: Optional[np.ndarray] = None,
                        sampling: str = "natural", seed: int = 0, epoch_counter=None, extra_real_rows: int = 0,
                        real_rows_ahead: Optional[int] = 0, real_slice_rows: Optional[int] = None,
                        max_retries: int = 3) -> EpochStreamDatasource:
    """The source of one epoch's stream: the real rows (if given; `sampling`, `seed` and `epoch_counter`
    as in data/ray_dataset.py's to_ray_dataset, plus `extra_real_rows` repeats) and the pool's current
    chunks. At most about `real_rows_ahead` real rows (at least one slice) are read before the first
    chunk is made; None reads them all at once. Real rows are read in slices of about
    `real_slice_rows` (None: one slice per chunk).

    Read tasks ask for no CPU: they only gather rows and wait on the actors, and the Train workers
    hold the CPUs.
    """
    from ioisray.data.ray_dataset import put_arrays

    real = None
    if real_images is not None:
        real = {"stored": put_arrays(real_images, real_labels), "images": len(real_labels),
                "rows": len(real_labels) + extra_real_rows, "sampling": sampling, "seed": seed,
                "epoch_counter": epoch_counter, "ahead": real_rows_ahead, "slice_rows": real_slice_rows}
    return EpochStreamDatasource(pool, chunk_sizes, image_shape, real, max_retries)


def epoch_stream(pool: SynthesisPool, chunk_sizes: list[int], image_shape: tuple[int, int, int], *,
                 concurrency: Optional[int] = None, **source_options) -> "ray.data.Dataset":
    """The Ray dataset whose every execution streams one epoch (see epoch_stream_source)."""
    source = epoch_stream_source(pool, chunk_sizes, image_shape, **source_options)
    return ray.data.read_datasource(source, override_num_blocks=len(source.get_read_tasks(1)), num_cpus=0,
                                    concurrency=concurrency)


def read_concurrency(pool_size: int) -> int:
    """Read tasks of the training stream at once: most wait on a chunk, a few per actor keep it busy."""
    return 4 * pool_size


def real_rows_ahead(shuffle_buffer: int, batch_size: int, num_workers: int) -> int:
    """Real rows read before the first chunk is made (about; at least one slice is). With a local
    shuffle buffer, a worker yields its first batch only once the buffer holds 1.5x its size plus a
    batch (Ray Data's ShufflingBatcher), so that many per worker go ahead and training starts at once.
    Without one, none need to: a worker's first batch waits for its second block anyway (Ray Data's
    iterator looks a block ahead), which comes with the first chunk, so that batch can carry it."""
    if not shuffle_buffer:
        return 0
    return (shuffle_buffer * 3 // 2 + batch_size) * max(num_workers, 1)


def training_stream(cfg, images: np.ndarray, labels: np.ndarray, pool: SynthesisPool, num_workers: int,
                    epoch_counter=None) -> "ray.data.Dataset":
    """Every real training image, in a new order each epoch (the epoch `epoch_counter` holds), plus the
    pool's chunks of the current epoch, for a run's config `cfg`.

    Ray Train gives each worker an equal share by dropping the remainder, so the real part gets a few
    repeated real images until the total divides evenly: no synthetic image is dropped.
    """
    from ioisray.synthesis.plan import chunk_sizes, epoch_budget

    s, t = cfg.synthesis, cfg.train
    budget = epoch_budget(s)
    return epoch_stream(pool, chunk_sizes(budget, s.chunk_size, s.pool_size),
                        (cfg.data.image_size, cfg.data.image_size, 3),
                        real_images=images, real_labels=labels, sampling=cfg.method.sampling, seed=cfg.seed,
                        epoch_counter=epoch_counter, extra_real_rows=-(len(labels) + budget) % max(num_workers, 1),
                        real_rows_ahead=(real_rows_ahead(t.shuffle_buffer, t.batch_size, num_workers)
                                         if s.pace_real_reads else None),
                        real_slice_rows=t.batch_size, max_retries=s.max_retries,
                        concurrency=read_concurrency(s.pool_size))
