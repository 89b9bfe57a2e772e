"""Synthesis pool throughput with 1, 2, ... actors (one CPU thread each, guided DDIM): images/s over one
epoch's quota, how the quota was split, and the time from the epoch's start to its first finished chunk.

    python benchmarks/pool_scaling.py --actors 1,2 --budget 96 --chunk 8 --steps 20

Epoch 0 splits the chunks evenly (no throughput known yet); epoch 1 splits them by the images/s each
actor measured in epoch 0, as in training. The UNet (`tiny`, 28x28, 7 classes) and the guiding
ResNet-18 have random weights: speed does not depend on them.
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
from ioisray.recipes.common import cpu_state_dict
from ioisray.sampler import SamplerConfig
from ioisray.synthesis.generator import DiffusionGenerator
from ioisray.synthesis.plan import plan_epoch
from ioisray.synthesis.pool import start_pool

CLASSES, SIZE = 7, 28


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--actors", default="1,2")
    ap.add_argument("--budget", type=int, default=96)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    sizes = [int(a) for a in args.actors.split(",")]
    ray.init(num_cpus=max(sizes) + 1, include_dashboard=False, logging_level="ERROR")
    unet_dir = tempfile.mkdtemp(prefix="pool-bench-unet-")
    create_unet("tiny", CLASSES, image_size=SIZE).save_pretrained(unet_dir, safe_serialization=True)
    make_classifier = functools.partial(timm.create_model, "resnet18", pretrained=False, num_classes=CLASSES)
    weights = ray.put(cpu_state_dict(make_classifier()))
    quotas = np.full(CLASSES, args.budget // CLASSES)
    quotas[: args.budget - quotas.sum()] += 1
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
            chunks = plan_epoch(quotas, epoch, 0, args.chunk)
            start = time.time()
            ray.get(pool.start_epoch.remote(epoch, chunks, [weights]))
            refs = [ray.get(pool.chunk.remote(i))[1][0] for i in range(len(chunks))]
            ray.wait(refs, num_returns=1)
            first = time.time() - start
            ray.get(refs)
            wall = time.time() - start
            stats = ray.get(pool.epoch_stats.remote())
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


if __name__ == "__main__":
    main()
