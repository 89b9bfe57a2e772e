"""One epoch's synthesis plan: which (label, seed) pairs to generate, in chunks, and which actor makes each.

Pure Python/NumPy, no Ray. The budget N is fixed for a run, so an epoch always has the same number of
chunks (see chunk_sizes); only their labels change with the quotas. That is what lets a Ray Data
source with a fixed set of read tasks (one per chunk) serve a different plan every epoch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

# Image i of epoch e in a run with seed s has noise seed s * SEED_RUN + e * SEED_EPOCH + i, so any
# synthetic image can be regenerated from (seed, epoch, index), and no two images of a run share one.
SEED_EPOCH = 1_000_000
SEED_RUN = 1_000_000_000


@dataclass(frozen=True)
class Chunk:
    index: int
    labels: np.ndarray  # int64 (n,)
    seeds: np.ndarray  # int64 (n,)

    def __len__(self) -> int:
        return len(self.labels)


def num_chunks(budget: int, chunk_size: int) -> int:
    return len(chunk_sizes(budget, chunk_size))


def chunk_sizes(budget: int, chunk_size: int) -> list[int]:
    """Images per chunk of every epoch's plan: a short ramp (chunk_size/8, /4, /2), full chunks, then
    the remainder.

    The first chunks go one to each actor, so small ones reach the trainer within seconds of the epoch's
    start instead of after chunk_size / (images/s) seconds; three extra chunks cost next to nothing.
    """
    ramp = [c for c in dict.fromkeys((chunk_size // 8, chunk_size // 4, chunk_size // 2)) if 0 < c < chunk_size]
    sizes, left = [], budget
    for size in ramp + [chunk_size] * math.ceil(max(budget, 0) / chunk_size):
        if left <= 0:
            break
        sizes.append(min(size, left))
        left -= sizes[-1]
    return sizes


def image_seeds(run_seed: int, epoch: int, count: int) -> np.ndarray:
    if count > SEED_EPOCH:
        raise ValueError(f"synthesis.budget {count} exceeds {SEED_EPOCH} images per epoch")
    return run_seed * SEED_RUN + epoch * SEED_EPOCH + np.arange(count, dtype=np.int64)


def plan_epoch(quotas: Sequence[int], epoch: int, run_seed: int, chunk_size: int) -> list[Chunk]:
    """Chunks holding exactly quotas[c] images of each class c.

    Labels are shuffled (seeded by run and epoch) before chunking, so every chunk, and so every early
    block the trainer receives, mixes classes in proportion to the quotas.
    """
    q = np.asarray(quotas, dtype=np.int64)
    if q.ndim != 1 or (q < 0).any():
        raise ValueError(f"quotas must be non-negative integers per class, got {quotas!r}")
    if chunk_size < 1:
        raise ValueError(f"synthesis.chunk_size must be >= 1, got {chunk_size}")
    labels = np.repeat(np.arange(q.size, dtype=np.int64), q)
    labels = np.random.default_rng([run_seed, epoch]).permutation(labels)
    seeds = image_seeds(run_seed, epoch, len(labels))
    sizes = chunk_sizes(len(labels), chunk_size)
    return [Chunk(i, labels[e - n:e], seeds[e - n:e]) for i, (e, n) in enumerate(zip(np.cumsum(sizes), sizes))]


def assign_chunks(sizes: Sequence[int], throughputs: Sequence[float]) -> list[int]:
    """Actor index for each chunk, in chunk order: each goes to the actor that would finish it first.

    Actors then get work in proportion to their measured throughput (images/s), so a slow actor does
    not hold the epoch back; and since chunk i is among the first finished, read tasks that ask for
    chunks in index order receive them roughly as they are produced.
    """
    rates = np.asarray(throughputs, dtype=np.float64)
    if rates.ndim != 1 or rates.size == 0 or not np.all(np.isfinite(rates)) or (rates <= 0).any():
        raise ValueError(f"throughputs must be positive numbers, one per actor, got {throughputs!r}")
    busy_until = np.zeros_like(rates)
    owners = []
    for size in sizes:
        finish = busy_until + size / rates
        a = int(np.argmin(finish))  # ties go to the lower actor index
        busy_until[a] = finish[a]
        owners.append(a)
    return owners
