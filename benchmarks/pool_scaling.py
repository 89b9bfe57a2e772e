"""Synthesis pool throughput with 1, 2, ... actors: images/s over one epoch's quota, the share of the
actors' summed rate it reaches, how the quota was split, and the time to the epoch's first chunk.

    python benchmarks/pool_scaling.py --actors 1,2 --budget 96 --chunk 8 --steps 20      # real tiny UNets, CPU

Each actor runs the real DiffusionGenerator (tiny UNet, 28x28, 7 classes, random weights, guided by a
random ResNet-18: speed does not depend on the weights) on one CPU thread.

More actors than cores, simulated: `--simulate 32` replaces each generator by one that sleeps 1/32 s per
image (no CPU), so the pool's scheduling is measured with 8 or 16 actors on a small machine; `--slow
0.5` makes the last actor half as fast. `--compare` runs, in the same sitting, the earlier static
scheduling as well: each epoch's chunks split among the actors in advance (evenly in epoch 0, by the
images/s each actor measured in the previous epoch after), without the plan's shrinking last chunks:

    python benchmarks/pool_scaling.py --simulate 32 --slow 0.5 --actors 2,4,8,16 --budget 512 --chunk 16 --compare
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import tempfile
import time

import numpy as np
import ray
import timm

from ioisray.models import cpu_state_dict
from ioisray.models.diffusion import create_unet
from ioisray.sampler import SamplerConfig
from ioisray.synthesis.generator import DiffusionGenerator
from ioisray.synthesis.plan import plan_epoch
from ioisray.synthesis.pool import PoolCoordinator, SynthesisPool, _Epoch

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


def assign_chunks(sizes, throughputs) -> list[int]:
    """The old split: each chunk, in order, to the actor that would finish it first at its rate."""
    busy_until, owners = np.zeros(len(throughputs)), []
    for size in sizes:
        finish = busy_until + size / np.asarray(throughputs)
        owners.append(int(np.argmin(finish)))
        busy_until[owners[-1]] = finish[owners[-1]]
    return owners


class StaticCoordinator(PoolCoordinator):
    """The earlier static scheduling, for comparison: every chunk submitted at once to the actor
    chosen in advance by last epoch's measured images/s (evenly before any is known)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rates = [None] * len(self.actors)

    async def start_epoch(self, plan_epoch, chunks, weights, reuse=False):
        if self.epoch is not None:  # images/s per actor, measured last epoch
            for slot, owned in enumerate(self.owned):
                done = [self.epoch.timings[i] for i in owned if self.epoch.timings[i]]
                if done:
                    self.rates[slot] = sum(t["images"] for t in done) / sum(t["seconds"] for t in done)
        known = [r for r in self.rates if r]
        rates = [r or (float(np.mean(known)) if known else 1.0) for r in self.rates]
        owners = assign_chunks([len(c) for c in chunks], rates)
        self.owned = [[i for i, o in enumerate(owners) if o == slot] for slot in range(len(self.actors))]
        self.epoch = _Epoch(plan_epoch, chunks, weights[0])
        self._feeding = asyncio.ensure_future(asyncio.gather(*(self._submit_all(slot, self.epoch)
                                                               for slot in range(len(self.actors)))))

    async def _submit_all(self, slot, epoch):
        pending = []
        for i in self.owned[slot]:
            data, timing = self.actors[slot].generate.options(num_returns=2).remote(
                epoch.plan_epoch, epoch.chunks[i], [epoch.weights])
            epoch.refs[i] = data
            epoch.handed_out[i].set()
            pending.append((i, timing))
        for i, timing in pending:
            epoch.timings[i] = await timing
            epoch.done_after[i] = time.monotonic() - epoch.started


def start(make_generator, size: int, scheduling: str, num_cpus: float) -> SynthesisPool:
    if scheduling == "pull":
        return SynthesisPool.start(make_generator, size, num_cpus=num_cpus)
    options = {"num_cpus": num_cpus, "num_gpus": 0, "resources": {}, "scheduling_strategy": "DEFAULT"}
    coordinator = ray.remote(StaticCoordinator).options(num_cpus=0).remote(make_generator, size, options, 3)
    ray.get(coordinator.ready.remote())
    return SynthesisPool(coordinator, size)


def even_quotas(budget: int) -> np.ndarray:
    quotas = np.full(CLASSES, budget // CLASSES)
    quotas[: budget - quotas.sum()] += 1
    return quotas


def run_epoch(pool: SynthesisPool, quotas, epoch: int, chunk: int, actors: int, weights=None):
    """One epoch: (wall s from start_epoch to the last chunk read, s to the first chunk, the pool's stats)."""
    chunks = plan_epoch(quotas, epoch, 0, chunk, actors)
    start = time.monotonic()
    pool.start_epoch(epoch, chunks, weights)
    first_ref = ray.get(pool.coordinator.chunk.remote(0))[1][0]
    ray.wait([first_ref], fetch_local=False)
    first = time.monotonic() - start
    ray.get([ray.get(pool.coordinator.chunk.remote(i))[1][0] for i in range(len(chunks))])
    return time.monotonic() - start, first, pool.wait_until_made(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--actors", default="1,2")
    ap.add_argument("--budget", type=int, default=96)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--simulate", type=float, default=None, metavar="IMAGES_PER_S",
                    help="sleeping stand-in generators at this rate instead of the diffusion model")
    ap.add_argument("--slow", type=float, default=1.0, help="with --simulate: the last actor's speed factor")
    ap.add_argument("--compare", action="store_true", help="also run the earlier static scheduling")
    args = ap.parse_args()
    sizes = [int(a) for a in args.actors.split(",")]
    ray.init(address="local", num_cpus=max(sizes) + 1, include_dashboard=False, logging_level="ERROR")
    quotas = even_quotas(args.budget)
    schedulings = ["static", "pull"] if args.compare else ["pull"]
    what = (f"simulated actors at {args.simulate} images/s each, the last at {args.slow}x" if args.simulate else
            f"guided DDIM-{args.steps}, tiny {SIZE}x{SIZE}, 1 CPU thread per actor")
    print(f"budget {args.budget} images per epoch, chunks of {args.chunk}; {what}")
    print("| scheduling | actors | epoch | chunks | wall s | images/s | of the actors' summed rate | images per actor "
          "| first chunk after s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in sizes:
        for scheduling in schedulings:
            weights, book = None, None
            if args.simulate:
                rates = [args.simulate] * n
                rates[-1] *= args.slow
                book = ray.remote(RateBook).remote(rates)
                make_generator, summed = functools.partial(SleepGenerator, book), sum(rates)
                pool = start(make_generator, n, scheduling, num_cpus=0)
            else:
                unet_dir = tempfile.mkdtemp(prefix="pool-bench-unet-")
                create_unet("tiny", CLASSES, image_size=SIZE).save_pretrained(unet_dir, safe_serialization=True)
                make_classifier = functools.partial(timm.create_model, "resnet18", pretrained=False, num_classes=CLASSES)
                weights = cpu_state_dict(make_classifier())
                make_generator = functools.partial(
                    DiffusionGenerator, unet_dir, CLASSES, SamplerConfig(steps=args.steps, guidance_scale=1.0),
                    make_classifier=make_classifier, num_threads=1)
                pool, summed = start(make_generator, n, scheduling, num_cpus=1), None
            # The old plan had no shrinking tail: one actor's plan is the same sizes.
            plan_actors = n if scheduling == "pull" else 1
            for epoch in range(args.epochs):
                wall, first, stats = run_epoch(pool, quotas, epoch, args.chunk, plan_actors, weights)
                rate = args.budget / wall
                share = f"{rate / summed:.0%}" if summed else ""
                chunks = len(plan_epoch(quotas, epoch, 0, args.chunk, plan_actors))
                print(f"| {scheduling} | {n} | {epoch} | {chunks} | {wall:.2f} | {rate:.1f} | {share} | "
                      f"{sorted(stats['images'], reverse=True)} | {first:.2f} |", flush=True)
            pool.shutdown()
            if book is not None:
                ray.kill(book)
    ray.shutdown()


if __name__ == "__main__":
    main()
