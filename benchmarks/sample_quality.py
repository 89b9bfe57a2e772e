"""Do a pretrained diffusion model's samples look like their class to a classifier?

Samples `--per-class` images of each class from the same seeds unguided and with classifier
guidance in both forms (noisy x_t as in the paper, predicted x0), guided by one trained classifier
(`--guide`, a finished `ioisray train` run) and judged by another (`--judge`, trained with another
seed, so guidance cannot simply fool the judge), and prints per-class accuracy of the judge.

    python benchmarks/sample_quality.py --unet outputs/dermamnist_diffusion/unet \
        --guide outputs/dermamnist_ce_s0 --judge outputs/dermamnist_ce_s1 --per-class 64 --steps 50

`--cfg-scale w` adds classifier-free guidance to every setting (a model pretrained with
diffusion.label_dropout > 0); `--guidance-objective entropy` guides towards the guide's uncertainty.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from ioisray.engine import predict
from ioisray.models.diffusion import load_noise_scheduler, load_unet, null_class
from ioisray.models.trained import load_classifier_run
from ioisray.sampler import SamplerConfig, sample


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--unet", required=True, type=Path)
    ap.add_argument("--guide", required=True, type=Path)
    ap.add_argument("--judge", required=True, type=Path)
    ap.add_argument("--per-class", type=int, default=32)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--scales", default="1.0", help="comma-separated guidance scales")
    ap.add_argument("--cfg-scale", type=float, default=1.0,
                    help="classifier-free guidance weight w (sampler.cfg_scale); 1: none")
    ap.add_argument("--guidance-objective", choices=("log_prob", "entropy"), default="log_prob",
                    help="what classifier guidance pushes up (sampler.guidance_objective)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    guide, gcfg, names = load_classifier_run(args.guide)
    judge, jcfg, _ = load_classifier_run(args.judge)
    unet = load_unet(str(args.unet), len(names)).eval()
    if args.cfg_scale != 1 and null_class(unet) is None:
        raise SystemExit(f"--cfg-scale (sampler.cfg_scale) {args.cfg_scale:g}: {args.unet} has no null class "
                         f"(pretrain it with diffusion.label_dropout > 0)")
    noise_scheduler = load_noise_scheduler(args.unet)
    size = jcfg.data.image_size
    labels = [c for c in range(len(names)) for _ in range(args.per_class)]
    seeds = list(range(len(labels)))
    settings = [("unguided", 0.0, "x_t")] + [(f"{form} s={s}", float(s), form)
                                             for form in ("x_t", "x0") for s in args.scales.split(",")]
    if args.cfg_scale != 1 or args.guidance_objective != "log_prob":
        print(f"classifier-free guidance w={args.cfg_scale:g}, guidance objective {args.guidance_objective}")
    print("| sampling | judge BACC | guide BACC | " + " | ".join(names) + " | img/s |")
    print("|---|---|---|" + "---|" * len(names) + "---|")
    for title, scale, form in settings:
        cfg = SamplerConfig(steps=args.steps, guidance_scale=scale, guidance_form=form, dtype="float32",
                            cfg_scale=args.cfg_scale, guidance_objective=args.guidance_objective)
        images, t0 = [], time.perf_counter()
        for i in range(0, len(labels), args.batch):
            images.append(sample(unet, labels[i:i + args.batch], seeds[i:i + args.batch], cfg,
                                 classifier=guide if scale > 0 else None, scheduler=noise_scheduler,
                                 output_size=size).images)
        rate = len(labels) / (time.perf_counter() - t0)
        batches = [{"image": im, "label": torch.tensor(labels[i * args.batch:i * args.batch + len(im)])}
                   for i, im in enumerate(images)]
        y, p_judge = predict(judge, batches, torch.device("cpu"))
        _, p_guide = predict(guide, batches, torch.device("cpu"))
        per_class = [(p_judge.argmax(1)[y == c] == c).mean() for c in range(len(names))]
        guide_bacc = np.mean([(p_guide.argmax(1)[y == c] == c).mean() for c in range(len(names))])
        print(f"| {title} | {np.mean(per_class):.3f} | {guide_bacc:.3f} | "
              + " | ".join(f"{a:.3f}" for a in per_class) + f" | {rate:.1f} |", flush=True)


if __name__ == "__main__":
    main()
