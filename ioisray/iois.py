"""IOIS: Iterative Online Image Synthesis (MICCAI 2024), the part of the training loop it adds.

Each epoch e, on top of ordinary training (recipes/train.py):

    1. Accuracy Adaptive Sampling: quotas n_c = N * softmax((1 - a_c) / T), a_c the per-class accuracy
       on the real training images in epoch e-1 (uniform at e = 0)                    -> epoch_quotas
    2. the classifier as it ended epoch e-1 goes to the object store once, and the
       synthesis pool starts generating the quotas, guided by it, in chunks           -> begin_epoch
    3. training starts at once: every real training image plus the chunks as they are produced
       stream into the workers' shards (Ray Data); each synthetic image is used once, and only in
       the epoch it was made for                                                      -> training_dataset
    4. the epoch's per-class accuracy on real images updates AAS; the pool reports its throughput,
       the workers what they received                                                 -> end_epoch

Ablations by config: `aas.enabled: false` (uniform quotas), `synthesis.guidance: false` (unguided), and
`synthesis.mode: offline` (one set of `synthesis.budget` images, uniform quotas, unguided, made once
and reused every epoch). At e = 0 there is no trained classifier yet, so epoch 0 is unguided.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import numpy as np
import torch

from ioisray import aas
from ioisray.config import Config
from ioisray.distributed import all_reduce_min, all_reduce_sum, barrier
from ioisray.recipes.common import cpu_state_dict
from ioisray.synthesis.plan import Chunk, chunk_sizes, plan_epoch
from ioisray.synthesis.tally import SyntheticTally


def is_on(cfg: Config) -> bool:
    return cfg.synthesis.mode != "none"


def epoch_quotas(cfg: Config, state: aas.AASState) -> np.ndarray:
    """Step 1: this epoch's quotas (remembered in `state` for the checkpoint)."""
    if cfg.synthesis.mode == "online" and cfg.aas.enabled:
        return state.quotas(cfg.synthesis.budget, cfg.aas.temperature, floor=cfg.aas.floor)
    q = aas.quotas(None, cfg.synthesis.budget, num_classes=state.num_classes, floor=cfg.aas.floor)
    state.last_quotas = [int(v) for v in q]
    return q


def plan(cfg: Config, quotas: np.ndarray, epoch: int) -> tuple[int, list[Chunk]]:
    """(plan epoch, chunks): offline synthesis always plays epoch 0's plan."""
    plan_epoch_ = epoch if cfg.synthesis.mode == "online" else 0
    return plan_epoch_, plan_epoch(quotas, plan_epoch_, cfg.seed, cfg.synthesis.chunk_size)


def begin_epoch(cfg: Config, pool, state: aas.AASState, classifier: torch.nn.Module, epoch: int,
                rank: int) -> tuple[int, np.ndarray]:
    """Steps 1-2 on rank 0; every rank waits until the pool has this epoch's plan, so no worker can
    start reading the epoch's stream before it exists. Returns (plan epoch, quotas)."""
    import ray

    quotas = epoch_quotas(cfg, state)  # same AAS state on every rank, so the same quotas
    plan_epoch_, chunks = plan(cfg, quotas, epoch)
    if rank == 0:
        guided = cfg.synthesis.mode == "online" and cfg.synthesis.guidance and epoch > 0
        weights = ray.put(cpu_state_dict(classifier)) if guided else None
        ray.get(pool.start_epoch.remote(plan_epoch_, chunks, [weights], reuse=cfg.synthesis.mode == "offline"))
    barrier()
    return plan_epoch_, quotas


def end_epoch(pool, tally: SyntheticTally, rank: int) -> dict:
    """Step 4's synthesis side: images received per class (all workers), time to the first synthetic
    batch (and, to see where that time goes, to the first batch of any kind) at any worker, and, on
    rank 0, the pool's throughput per actor and times to its first and last chunk."""
    import ray

    received = all_reduce_sum(torch.as_tensor(tally.per_class, dtype=torch.float64)).long().tolist()
    firsts = all_reduce_min(torch.tensor([math.inf if t is None else t  # the first worker to get one
                                          for t in (tally.seconds_to_first, tally.seconds_to_first_batch)],
                                         dtype=torch.float64))
    first, first_batch = (float(t) if math.isfinite(float(t)) else None for t in firsts)
    out = {"synthetic_per_class": received, "seconds_to_first_synthetic": first, "seconds_to_first_batch": first_batch}
    if rank == 0:
        s = ray.get(pool.epoch_stats.remote())
        out.update(generation_seconds=s["last_chunk_done_at"] - s["epoch_started_at"],
                   seconds_to_first_chunk=s["first_chunk_done_at"] - s["epoch_started_at"],
                   images_per_second_per_actor=[s["images_per_second"][k] for k in sorted(s["images_per_second"])],
                   actors_started=s["actors_started"], synthesis_node_ids=s["node_ids"])
    return out


# ---------------------------------------------------------------------------------------------
# Driver side: the pool and the training stream


def start_synthesis(cfg: Config, model_dir: str, num_classes: int, make_classifier):
    """The SynthesisPool for this run (its actors load the diffusion model once, here).
    `make_classifier` builds the guide's architecture only (its weights come each epoch)."""
    from ioisray.sampler import SamplerConfig
    from ioisray.synthesis.generator import DiffusionGenerator
    from ioisray.synthesis.pool import start_pool

    s, sy = cfg.sampler, cfg.synthesis
    guided = sy.mode == "online" and sy.guidance and s.guidance_scale > 0
    sampler = SamplerConfig.from_settings(s, guidance_scale=s.guidance_scale if guided else 0.0,
                                          output_size=cfg.data.image_size)
    make_generator = functools.partial(
        DiffusionGenerator, model_dir, num_classes, sampler, make_classifier=make_classifier if guided else None,
        device="cuda" if sy.num_gpus > 0 else "cpu", num_threads=max(1, int(sy.num_cpus)) if sy.num_gpus == 0 else None,
        gpu_share=min(sy.num_gpus, 1.0) if sy.num_gpus > 0 else 1.0)
    return start_pool(make_generator, sy.pool_size, num_cpus=sy.num_cpus, num_gpus=sy.num_gpus,
                      resources=sy.resources, max_retries=sy.max_retries)


def read_concurrency(cfg: Config) -> int:
    """Read tasks of the training stream at once: most wait on a chunk, a few per actor keep it busy."""
    return 4 * cfg.synthesis.pool_size


def real_rows_ahead(cfg: Config, num_workers: int) -> int:
    """Real rows read before the first chunk is made (about; at least one slice is). With a local
    shuffle buffer, a worker yields its first batch only once the buffer holds 1.5x its size plus a
    batch (Ray Data's ShufflingBatcher), so that many per worker go ahead and training starts at once.
    Without one, none need to: a worker's first batch waits for its second block anyway (Ray Data's
    iterator looks a block ahead), which comes with the first chunk, so that batch can carry it."""
    if not cfg.train.shuffle_buffer:
        return 0
    return (cfg.train.shuffle_buffer * 3 // 2 + cfg.train.batch_size) * max(num_workers, 1)


def training_dataset(cfg: Config, images: np.ndarray, labels: np.ndarray, pool: Optional[object],
                     num_workers: int, epoch_counter=None):
    """Every real training image, in a new order each epoch (the epoch `epoch_counter` holds), plus
    (with synthesis on) the pool's chunks of the current epoch.

    Ray Train gives each worker an equal share by dropping the remainder, so the real part gets a few
    repeated real images until the total divides evenly: no synthetic image is dropped.
    """
    from ioisray.data.ray_dataset import to_ray_dataset
    from ioisray.synthesis.pool import epoch_stream

    if pool is None:
        return to_ray_dataset(images, labels, sampling=cfg.method.sampling, seed=cfg.seed,
                              epoch_counter=epoch_counter)
    budget = cfg.synthesis.budget
    size = cfg.data.image_size
    return epoch_stream(pool, chunk_sizes(budget, cfg.synthesis.chunk_size), (size, size, 3),
                        real_images=images, real_labels=labels, sampling=cfg.method.sampling, seed=cfg.seed,
                        epoch_counter=epoch_counter,
                        extra_real_rows=-(len(labels) + budget) % max(num_workers, 1),
                        real_rows_ahead=real_rows_ahead(cfg, num_workers) if cfg.synthesis.pace_real_reads else None,
                        real_slice_rows=cfg.train.batch_size,
                        max_retries=cfg.synthesis.max_retries, concurrency=read_concurrency(cfg))
