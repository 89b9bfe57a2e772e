"""Synthesis pool throughput with 1, 2, ... actors (one CPU thread each, guided DDIM): images/s over one
epoch's quota, how the quota was split, and the time from the epoch's start to its first finished chunk.

    python benchmarks/pool_scaling.py --actors 1,2 --budget 96 --chunk 8 --steps 20

Epoch 0 splits the chunks evenly (no throughput known yet); epoch 1 splits them by the images/s each
actor measured in epoch 0, as in training. The UNet (`tiny`, 28x28, 7 classes) and the guiding
ResNet-18 have random weights: speed does not depend on them.

More actors than cores, simulated: `--simulate 4` replaces each generator by one that sleeps 1/4 s per
image (no CPU), so the pool's planning and streaming are measured with 8 or 16 actors on a laptop;
`--slow 0.5` makes the last actor half as fast, to show the throughput split keeping it from holding
the epoch back:

    python benchmarks/pool_scaling.py --simulate 4 --slow 0.5 --actors 1,2,4,8,16 --budget 512 --chunk 8
"""
from __future__ import annotations

import argparse
import functools
import tempfile
import time

import numpy as np
import ray
import timm

from ioisray.models.diffusion import create_unet
from ioisray.models import cpu_state_dict
from ioisray.sampler import SamplerConfig
from ioisray.synthesis.generator import DiffusionGenerator
from ioisray.synthesis.plan import plan_epoch
from ioisray.synthesis.pool import start_pool

CLASSES, SIZE = 7, 28


class RateBook:
    """Hands each simulated actor its images/s, in the order the actors start."""

    def __init__(self, rates: list[float]):
        self.rates = list(rates)

    def take(self) -> float:
        return self.rates.pop(0)


class SleepGenerator:
    """Stands in for DiffusionGenerator: makes blank images at a fixed rate by sleeping."""

    def __init__(self, rate_book):
        self.rate = ray.get(rate_book.take.remote())

    def set_classifier(self, state) -> None:
        pass

    def generate(self, labels: np.ndarray, seeds: np.ndarray) -> dict:
        start = time.perf_counter()
        time.sleep(len(labels) / self.rate)
        return {"image": np.zeros((len(labels), SIZE, SIZE, 3), np.uint8), "label": np.asarray(labels, np.int64),
                "seed": np.asarray(seeds, np.int64), "seconds": time.perf_counter() - start}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--actors", default="1,2")
    ap.add_argument("--budget", type=int, default=96)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--simulate", type=float, default=None, metavar="IMAGES_PER_S",
                    help="sleeping stand-in generators at this rate instead of the diffusion model")
    ap.add_argument("--slow", type=float, default=1.0, help="with --simulate: the last actor's speed factor")
    args = ap.parse_args()
    sizes = [int(a) for a in args.actors.split(",")]
    ray.init(num_cpus=max(sizes) + 1, include_dashboard=False, logging_level="ERROR")
    if args.simulate:
        simulate(args, sizes)
        return
    unet_dir = tempfile.mkdtemp(prefix="pool-bench-unet-")
    create_unet("tiny", CLASSES, image_size=SIZE).save_pretrained(unet_dir, safe_serialization=True)
    make_classifier = functools.partial(timm.create_model, "resnet18", pretrained=False, num_classes=CLASSES)
    weights = ray.put(cpu_state_dict(make_classifier()))
    quotas = even_quotas(args.budget)
    print(f"budget {args.budget} images per epoch, chunks of {args.chunk}, guided DDIM-{args.steps}, "
          f"tiny {SIZE}x{SIZE}, 1 CPU thread per actor")
    print("| actors | epoch | wall s | images/s | vs 1 actor | images per actor | images/s per actor | first chunk after s |")
    print("|---|---|---|---|---|---|---|---|")
    single = None
    for n in sizes:
        make_generator = functools.partial(
            DiffusionGenerator, unet_dir, CLASSES, SamplerConfig(steps=args.steps, guidance_scale=1.0),
            make_classifier=make_classifier, num_threads=1)
        pool = start_pool(make_generator, n, num_cpus=1)
        for epoch in range(2):
            wall, first, stats = run_epoch(pool, quotas, epoch, args.chunk, weights)
            per_actor = [stats["images"].get(slot, 0) for slot in range(n)]
            rate = args.budget / wall
            if n == 1 and epoch == 1:
                single = rate
            speedup = f"{rate / single:.2f}x" if single else ""
            print(f"| {n} | {epoch} | {wall:.1f} | {rate:.2f} | {speedup} | {per_actor} | "
                  f"{[round(stats['images_per_second'][k], 2) for k in sorted(stats['images_per_second'])]} | "
                  f"{first:.1f} |", flush=True)
        ray.get(pool.shutdown.remote())
        ray.kill(pool)
    ray.shutdown()


def even_quotas(budget: int) -> np.ndarray:
    quotas = np.full(CLASSES, budget // CLASSES)
    quotas[: budget - quotas.sum()] += 1
    return quotas


def run_epoch(pool, quotas: np.ndarray, epoch: int, chunk: int, weights) -> tuple[float, float, dict]:
    """One epoch of the pool: (wall s, s to its first finished chunk, the pool's epoch stats)."""
    chunks = plan_epoch(quotas, epoch, 0, chunk)
    start = time.time()
    ray.get(pool.start_epoch.remote(epoch, chunks, [weights]))
    refs = [ray.get(pool.chunk.remote(i))[1][0] for i in range(len(chunks))]
    ray.wait(refs, num_returns=1)
    first = time.time() - start
    ray.get(refs)
    return time.time() - start, first, ray.get(pool.epoch_stats.remote())


def simulate(args, sizes: list[int]) -> None:
    quotas = even_quotas(args.budget)
    print(f"budget {args.budget} images per epoch, chunks of {args.chunk}; simulated actors at {args.simulate} "
          f"images/s each, the last one at {args.slow}x")
    print("| actors | epoch | wall s | images/s | of the actors' summed rate | images per actor | first chunk after s |")
    print("|---|---|---|---|---|---|---|")
    for n in sizes:
        rates = [args.simulate] * n
        rates[-1] *= args.slow
        book = ray.remote(RateBook).remote(rates)
        pool = start_pool(functools.partial(SleepGenerator, book), n, num_cpus=0)
        for epoch in range(2):
            wall, first, stats = run_epoch(pool, quotas, epoch, args.chunk, None)
            rate = args.budget / wall
            print(f"| {n} | {epoch} | {wall:.1f} | {rate:.1f} | {rate / sum(rates):.0%} | "
                  f"{[stats['images'].get(slot, 0) for slot in range(n)]} | {first:.2f} |", flush=True)
        ray.get(pool.shutdown.remote())
        ray.kill(pool)
        ray.kill(book)
    ray.shutdown()


if __name__ == "__main__":
    main()
