"""One epoch's synthesis plan: which (label, seed) pairs to generate, in chunks.

Pure Python/NumPy, no Ray. The budget N and the pool's size are fixed for a run, so an epoch always has
the same chunk sizes (see chunk_sizes); only their labels change with the quotas. That is what lets a
Ray Data source with a fixed set of read tasks (one per chunk) serve a different plan every epoch.
Which actor makes which chunk is decided while the epoch runs: an idle actor takes the next one.
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


def num_chunks(budget: int, chunk_size: int, actors: int = 1) -> int:
    return len(chunk_sizes(budget, chunk_size, actors))


def chunk_sizes(budget: int, chunk_size: int, actors: int = 1) -> list[int]:
    """Images per chunk of every epoch's plan: a short ramp (chunk_size/8, /4, /2), full chunks, and,
    with several actors, a tail of shrinking chunks.

    The first chunks go one to each actor, so small ones reach the trainer within seconds of the epoch's
    start instead of after chunk_size / (images/s) seconds. Actors take chunks as they become idle, so
    the epoch ends when the last chunk handed out is done; the tail (guided self-scheduling: each chunk
    1/(2 * actors) of what is left, at least chunk_size/16) keeps the chunks handed out last small, so
    the actors, fast or slow, finish within a small chunk of each other.
    """
    ramp = [c for c in dict.fromkeys((chunk_size // 8, chunk_size // 4, chunk_size // 2)) if 0 < c < chunk_size]
    smallest = max(1, chunk_size // 16)
    sizes, left = [], max(budget, 0)
    while left > 0:
        if len(sizes) < len(ramp):
            size = ramp[len(sizes)]
        elif actors > 1:
            size = max(smallest, min(chunk_size, math.ceil(left / (2 * actors))))
        else:
            size = chunk_size
        sizes.append(min(size, left))
        left -= sizes[-1]
    return sizes


def epoch_budget(synthesis) -> int:
    """synthesis.budget as the number of images an epoch, which `balance` only becomes once the training
    split's class counts are known (iois.resolve_budget)."""
    if not isinstance(synthesis.budget, int):
        raise ValueError(f"synthesis.budget={synthesis.budget!r} must be resolved from the training split's class "
                         f"counts first (ioisray.iois.resolve_budget)")
    return synthesis.budget


def image_seeds(run_seed: int, epoch: int, count: int) -> np.ndarray:
    if count > SEED_EPOCH:
        raise ValueError(f"synthesis.budget {count} exceeds {SEED_EPOCH} images per epoch")
    return run_seed * SEED_RUN + epoch * SEED_EPOCH + np.arange(count, dtype=np.int64)


def plan_epoch(quotas: Sequence[int], epoch: int, run_seed: int, chunk_size: int, actors: int = 1) -> list[Chunk]:
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
    sizes = chunk_sizes(len(labels), chunk_size, actors)
    return [Chunk(i, labels[e - n:e], seeds[e - n:e]) for i, (e, n) in enumerate(zip(np.cumsum(sizes), sizes))]
