"""How well a diffusion model recovers real training images at each noise level, and what its samples
look like in aggregate: a quick check that sampling will not drift (the clean-image estimate x0_hat
must stay near the data at high noise, where DDIM's first steps take it from).

    python benchmarks/denoising_error.py --unet outputs/dermamnist_diffusion/unet \
        --data dermamnist --root /path/to/dermamnist_28
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ioisray.data import load_dataset
from ioisray.models.diffusion import load_noise_scheduler, load_unet
from ioisray.sampler import SamplerConfig, epsilon_from, sample


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--unet", required=True)
    ap.add_argument("--data", required=True, help="dataset name, as data.name")
    ap.add_argument("--root", help="dataset folder, as data.root")
    ap.add_argument("--num", type=int, default=256, help="real images (and samples) to use")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    sched = load_noise_scheduler(args.unet)
    cfg = json.loads((Path(args.unet) / "config.json").read_text())
    size, num_classes = cfg["sample_size"], cfg["num_class_embeds"]
    unet = load_unet(args.unet, num_classes).eval()
    ds = load_dataset(args.data, args.root, image_size=size)
    # Training images only (the official split when the data has one): what the model was fitted to.
    pool = np.flatnonzero(ds.official_split == "train") if ds.official_split is not None else np.arange(len(ds.labels))
    idx = np.random.RandomState(0).choice(pool, min(args.num, len(pool)), replace=False)
    x0 = torch.from_numpy(ds.images[idx]).permute(0, 3, 1, 2).float() / 127.5 - 1
    y = torch.from_numpy(np.asarray(ds.labels)[idx]).long()
    print(f"model {args.unet}: {sched.config.prediction_type}, {sched.config.beta_schedule} betas")
    print("| t | noise MSE | x0_hat MSE | x0_hat std |")
    print("|---|---|---|---|")
    with torch.no_grad():
        for t in (100, 300, 500, 700, 850, 950, 999):
            noise = torch.randn_like(x0)
            tt = torch.full((len(y),), t)
            x_t = sched.add_noise(x0, noise, tt)
            out = unet(x_t, tt, class_labels=y).sample
            abar = sched.alphas_cumprod[t]
            eps = epsilon_from(out, x_t, abar, sched.config.prediction_type)
            x0_hat = (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()
            print(f"| {t} | {F.mse_loss(eps, noise):.4f} | {F.mse_loss(x0_hat, x0):.4f} | {x0_hat.std():.3f} |")
    labels = y[: min(64, len(y))].tolist()
    images = sample(unet, labels, list(range(len(labels))), SamplerConfig(steps=50), scheduler=sched).images
    samples = images.float() / 127.5 - 1
    print(f"real images: std {x0.std():.3f}, channel means {[round(v, 3) for v in x0.mean((0, 2, 3)).tolist()]}")
    print(f"DDIM-50 samples ({len(labels)}, labels of those images): std {samples.std():.3f}, "
          f"channel means {[round(v, 3) for v in samples.mean((0, 1, 2)).tolist()]}")


if __name__ == "__main__":
    main()
