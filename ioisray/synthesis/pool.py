"""The Ray side of synthesis: long-lived generator actors, the pool that plans their work, and the Ray
Data source that streams their chunks into the training shards.

    SynthesisActor         one per `synthesis.pool_size`; builds its DiffusionGenerator (loads the
                           model) once, takes the classifier weights once per epoch, generates chunks
    SynthesisPool          an actor owning the SynthesisActors; each epoch it assigns the plan's chunks
                           to actors by measured throughput and submits them all at once, so generation
                           runs ahead of training; it regenerates a chunk whose actor died
    EpochStreamDatasource  read tasks alternating between a slice of the real training rows and one
                           chunk (the task of chunk i asks the pool for chunk i of the current epoch).
                           Ray Train re-executes the dataset every epoch, so each execution reads that
                           epoch's plan, and Ray Data streams the blocks (with backpressure and equal
                           splitting) into the workers' shards as they come. Images go actor -> object
                           store -> worker, never via the driver.
"""
from __future__ import annotations

import functools
import os
import time
from typing import Callable, Optional

import numpy as np
import ray
from ray.data.block import BlockAccessor, BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from ioisray.synthesis.plan import Chunk, assign_chunks

# An actor that died or a lost result: regenerate the chunk. Anything else (a bug in generation) is raised.
RECOVERABLE = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError)


class SynthesisActor:
    """Holds one generator for the whole run (the diffusion model is loaded once, here)."""

    def __init__(self, make_generator: Callable):
        self.generator = make_generator()
        self.loads = 1

    def set_classifier(self, state: Optional[dict]) -> None:
        self.generator.set_classifier(state)

    def generate(self, plan_epoch: int, chunk: Chunk):
        out = self.generator.generate(chunk.labels, chunk.seeds)
        seconds = out.pop("seconds")
        n = len(chunk)
        out["synthetic"] = np.ones(n, dtype=np.int8)
        out["plan_epoch"] = np.full(n, plan_epoch, dtype=np.int64)
        timing = {"chunk": chunk.index, "images": n, "seconds": seconds, "done_at": time.time(),
                  "node_id": ray.get_runtime_context().get_node_id()}
        return out, timing

    def info(self) -> dict:
        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(), "loads": self.loads}


class SynthesisPool:
    """Plans and tracks one epoch of synthesis at a time over `size` SynthesisActors.

    Runs as a single-threaded actor: its calls (plan, hand out a chunk, replace an actor) are short
    and never overlap, so its bookkeeping needs no locks.
    """

    def __init__(self, make_generator: Callable, size: int, actor_options: dict, max_retries: int = 3):
        self._make_generator, self._options, self._max_retries = make_generator, actor_options, max_retries
        self.actors = [self._start_actor() for _ in range(size)]
        self.generation = [0] * size  # bumped when a slot's actor is replaced
        self.actors_started = size
        self.rates: list[Optional[float]] = [None] * size  # measured images/s per slot
        self.plan: list[Chunk] = []
        self.plan_epoch: Optional[int] = None
        self.weights = None
        self.refs: list = []  # per chunk: ObjectRef of its rows
        self.timings: list = []  # per chunk: ObjectRef of its timing dict
        self.owner: list[tuple[int, int]] = []  # per chunk: (slot, generation of that slot's actor)
        self.attempts: list[int] = []
        self.epoch_started_at = time.time()

    def _start_actor(self):
        return ray.remote(SynthesisActor).options(**self._options).remote(self._make_generator)

    def ready(self) -> list[dict]:
        """Waits until every actor has loaded its model; their pid, node and load count."""
        return ray.get([a.info.remote() for a in self.actors])

    def start_epoch(self, plan_epoch: int, plan: list[Chunk], weights: list, reuse: bool = False) -> None:
        """Submit every chunk of `plan`; `weights` is [ObjectRef of a state dict] or [None] (unguided).

        reuse=True keeps the results already made for the same plan (offline synthesis: one set, made
        once); they are only generated again if this pool has not made them (e.g. after a resume).
        """
        self._collect_rates()
        self.epoch_started_at = time.time()
        if reuse and self.plan_epoch == plan_epoch and len(self.refs) == len(plan):
            return
        self.plan, self.plan_epoch, self.weights = plan, plan_epoch, weights[0]
        for actor in self.actors:
            actor.set_classifier.remote(self.weights)  # a top-level ref: each actor fetches it once
        self.refs, self.timings = [None] * len(plan), [None] * len(plan)
        self.owner, self.attempts = [(0, 0)] * len(plan), [0] * len(plan)
        for i, slot in enumerate(assign_chunks([len(c) for c in plan], self._rates())):
            self._submit(i, slot)

    def _rates(self) -> list[float]:
        known = [r for r in self.rates if r]
        default = float(np.mean(known)) if known else 1.0
        return [r or default for r in self.rates]

    def _submit(self, i: int, slot: int) -> None:
        data, timing = self.actors[slot].generate.options(num_returns=2).remote(self.plan_epoch, self.plan[i])
        self.refs[i], self.timings[i], self.owner[i] = data, timing, (slot, self.generation[slot])

    def chunk(self, i: int):
        """(plan epoch, [ObjectRef of chunk i's rows]); the list keeps Ray from resolving the ref here."""
        if i >= len(self.refs):
            raise IndexError(f"chunk {i} asked for, but this epoch's plan has {len(self.refs)} chunks: the "
                             f"synthetic dataset was made for another budget or chunk size")
        return self.plan_epoch, [self.refs[i]]

    def chunk_failed(self, i: int, failed_ref_hex: str) -> None:
        """A reader could not get chunk i: replace its actor if that died, and generate it again."""
        if self.refs[i].hex() != failed_ref_hex:
            return  # another reader already reported it; the new ref is in place
        self.attempts[i] += 1
        if self.attempts[i] > self._max_retries:
            raise RuntimeError(f"synthesis chunk {i} failed {self.attempts[i]} times "
                               f"(synthesis.max_retries={self._max_retries})")
        slot, generation = self.owner[i]
        if generation == self.generation[slot]:  # the first failure seen from this actor: replace it
            ray.kill(self.actors[slot], no_restart=True)
            self.actors[slot] = self._start_actor()
            self.actors[slot].set_classifier.remote(self.weights)
            self.generation[slot] += 1
            self.actors_started += 1
            self.rates[slot] = None
        # Regenerate on the slot with the least queued work (a replacement starts with none).
        pending = [0] * len(self.actors)
        for j, (s, g) in enumerate(self.owner):
            if g == self.generation[s] and not ray.wait([self.timings[j]], timeout=0)[0]:
                pending[s] += len(self.plan[j])
        self._submit(i, int(np.argmin(pending)))

    def _timings_by_slot(self, finished_current_only: bool) -> dict[int, list[dict]]:
        """Timing dicts of the plan's chunks per actor slot; optionally only finished chunks made by the
        slot's current actor (a replaced actor's speed says nothing about its successor's)."""
        by_slot: dict[int, list[dict]] = {}
        for ref, (slot, generation) in zip(self.timings, self.owner):
            if ref is None or (finished_current_only and (generation != self.generation[slot]
                                                          or not ray.wait([ref], timeout=0)[0])):
                continue
            by_slot.setdefault(slot, []).append(ray.get(ref))
        return by_slot

    def _collect_rates(self) -> None:
        """Images/s per slot over the last epoch's finished chunks."""
        for slot, timings in self._timings_by_slot(True).items():
            self.rates[slot] = _images_per_second(timings)

    def epoch_stats(self) -> dict:
        """This epoch's images/s per actor slot, when its first and last chunks were done, and the Ray
        nodes its chunks were generated on."""
        by_slot = self._timings_by_slot(False)
        done = [t["done_at"] for ts in by_slot.values() for t in ts]
        return {
            "node_ids": sorted({t["node_id"] for ts in by_slot.values() for t in ts}),
            "images_per_second": {s: _images_per_second(ts) for s, ts in sorted(by_slot.items())},
            "images": {s: sum(t["images"] for t in ts) for s, ts in sorted(by_slot.items())},
            "epoch_started_at": self.epoch_started_at,
            "first_chunk_done_at": min(done, default=self.epoch_started_at),
            "last_chunk_done_at": max(done, default=self.epoch_started_at),
            "actors_started": self.actors_started,
        }

    def actor_handles(self) -> list:
        return [[a] for a in self.actors]

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)


def _images_per_second(timings: list[dict]) -> float:
    return sum(t["images"] for t in timings) / max(sum(t["seconds"] for t in timings), 1e-9)


def _synthetic_rows(pool, i: int, max_retries: int) -> dict:
    for _ in range(max_retries + 2):
        _, (ref,) = ray.get(pool.chunk.remote(i))
        try:
            return ray.get(ref)
        except RECOVERABLE:
            ray.get(pool.chunk_failed.remote(i, ref.hex()))  # raises once retries are used up
    raise RuntimeError(f"synthesis chunk {i}: no result after {max_retries + 1} attempts")


def _real_rows(real: dict, i: int, num_tasks: int) -> dict:
    from ioisray.data.ray_dataset import current_epoch, gather_rows, row_order

    ids = np.arange(i, real["rows"], num_tasks)  # task i reads every num_tasks-th row of the order
    order = row_order(real["images"], real["sampling"], real["seed"], real["rows"] - real["images"],
                      current_epoch(real["epoch_counter"]))  # this epoch's
    if order is not None:
        ids = order[ids]
    rows = gather_rows(ray.get(real["arrays"][0]), ids, real["sampling"])
    n = len(ids)  # the columns synthetic rows carry, so that both share one stream
    rows.update(seed=np.full(n, -1, np.int64), synthetic=np.zeros(n, np.int8), plan_epoch=np.full(n, -1, np.int64))
    return rows


def _read_real(real: dict, i: int, num_slices: int, pool=None, after_chunk: Optional[int] = None):
    if after_chunk is not None:
        # Pacing: wait until chunk `after_chunk` is made (or failed: its own read task regenerates it),
        # so that real rows cannot queue up in the shards ahead of the synthetic ones.
        _, (ref,) = ray.get(pool.chunk.remote(after_chunk))
        ray.wait([ref], fetch_local=False)
    yield BlockAccessor.batch_to_block(_real_rows(real, i, num_slices))


def _read_chunk(pool, i: int, max_retries: int):
    yield BlockAccessor.batch_to_block(_synthetic_rows(pool, i, max_retries))


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


def start_pool(make_generator: Callable, size: int, *, num_cpus: float = 1.0, num_gpus: float = 0.0,
               resources: Optional[dict] = None, max_retries: int = 3):
    """A SynthesisPool actor (0 CPU: it only plans) with `size` generator actors, models loaded."""
    # "DEFAULT" scheduling: started from a Tune trial, the actors would otherwise be placed in the
    # trial's own placement group (0.1 CPU), where they do not fit.
    options = {"num_cpus": num_cpus, "num_gpus": num_gpus, "resources": dict(resources or {}),
               "scheduling_strategy": "DEFAULT"}
    pool = ray.remote(SynthesisPool).options(num_cpus=0, scheduling_strategy="DEFAULT").remote(
        make_generator, size, options, max_retries)
    ray.get(pool.ready.remote())
    return pool


def epoch_stream_source(pool, chunk_sizes: list[int], image_shape: tuple[int, int, int], *,
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
        real = {"arrays": [put_arrays(real_images, real_labels)], "images": len(real_labels),
                "rows": len(real_labels) + extra_real_rows, "sampling": sampling, "seed": seed,
                "epoch_counter": epoch_counter, "ahead": real_rows_ahead, "slice_rows": real_slice_rows}
    return EpochStreamDatasource(pool, chunk_sizes, image_shape, real, max_retries)


def epoch_stream(pool, chunk_sizes: list[int], image_shape: tuple[int, int, int], *, concurrency: Optional[int] = None,
                 **source_options) -> "ray.data.Dataset":
    """The Ray dataset whose every execution streams one epoch (see epoch_stream_source)."""
    source = epoch_stream_source(pool, chunk_sizes, image_shape, **source_options)
    return ray.data.read_datasource(source, override_num_blocks=len(source.get_read_tasks(1)), num_cpus=0,
                                    concurrency=concurrency)
