"""Guided sampler speed per diffusion preset and optimisation: images/s, GFLOP per image and the
fraction of the device's peak it reaches, all variants on the same model, labels and seeds in one run.

    python benchmarks/synthesis.py --presets tiny --batch 32                 # CPU, random weights
    python benchmarks/synthesis.py --presets small64,adm128 --batch 64 --device cuda --compile
    python benchmarks/synthesis.py --unet outputs/dermamnist_diffusion/unet \
        --guide outputs/dermamnist_ce_s0 --judge outputs/dermamnist_ldam_drw_s0   # trained, with quality

Without --unet/--guide the model and the guiding classifier (timm ResNet-18) have random weights:
speed does not depend on them, but their images are mostly saturated, so the image differences say
little. Every variant's images are compared with the reference variant's (fp32, DDIM, all steps,
guided; same labels and seeds): largest and mean difference in 8-bit grey levels, and, with --judge
(a finished run trained independently of the guide), that classifier's balanced accuracy on them. The peak is a measured
matmul peak of this device (bf16 on CUDA, fp32 on CPU) unless --peak-tflops is given.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import time

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ioisray.engine import predict
from ioisray.models.diffusion import create_unet, load_noise_scheduler, load_unet
from ioisray.sampler import SamplerConfig, default_classifier_transform, sample


def measured_peak_tflops(device: torch.device, n: int | None = None) -> float:
    """The faster of fp32 and bf16 square (n x n) matmuls on this device (the best any variant could reach)."""
    n = n or (4096 if device.type == "cuda" else 2048)
    best = 0.0
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(2):
            a @ b
        _sync(device)
        reps, start = 10, time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - start) / 1e12)
    return best


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def gflop_per_image(unet, classifier, cfg: SamplerConfig, batch: int, device, output_size=None) -> float:
    """One guided step (UNet forward, classifier forward and backward) counted, times the steps."""
    size = unet.config.sample_size
    x = torch.randn(batch, 3, size, size, device=device)
    t = torch.full((batch,), 500, device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    transform = default_classifier_transform(output_size)
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            unet(x, t, class_labels=y)
        if cfg.guidance_scale > 0:
            xg = x.clone().requires_grad_(True)
            torch.autograd.grad(F.log_softmax(classifier(transform(xg)), -1)[:, 0].sum(), xg)
    return counter.get_total_flops() * cfg.steps / batch / 1e9


def run(unet, classifier, cfg, labels, seeds, device, schedule=None, repeats: int = 1, output_size=None):
    # Warm-up (and compilation): the full batch, so a compiled UNet is not compiled again for its shape
    # inside the timed run.
    sample(unet, labels, seeds, dataclasses.replace(cfg, steps=2), classifier=classifier,
           scheduler=schedule, device=device, output_size=output_size)
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        out = sample(unet, labels, seeds, cfg, classifier=classifier, scheduler=schedule, device=device,
                     output_size=output_size)
    _sync(device)
    return out.images, repeats * len(labels) / (time.perf_counter() - start)


def main() -> None:
    # Here, not at the top: the helpers above (gpu_acceptance.py uses them) need no config, hence no pydantic.
    from ioisray.models.trained import load_classifier_run

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="tiny")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="add torch.compile variants")
    ap.add_argument("--peak-tflops", type=float)
    ap.add_argument("--classes", type=int, default=7)
    ap.add_argument("--unet", help="a trained diffusion model folder (instead of --presets)")
    ap.add_argument("--guide", help="a finished `ioisray train` run whose classifier guides")
    ap.add_argument("--judge", help="a finished `ioisray train` run that judges the samples")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    peak = args.peak_tflops or measured_peak_tflops(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    print(f"device: {name}; peak {peak:.2f} TFLOP/s ({'given' if args.peak_tflops else 'measured matmul, best of fp32/bf16'}); "
          f"torch {torch.__version__}")
    print("| preset | variant | batch | steps | images/s | GFLOP/image | TFLOP/s | % of peak | grey levels from reference |"
          + (" judge BACC |" if args.judge else ""))
    print("|---|---|---|---|---|---|---|---|---|" + ("---|" if args.judge else ""))
    judge = load_classifier_run(args.judge)[0].to(device) if args.judge else None
    for preset in ([args.unet] if args.unet else args.presets.split(",")):
        torch.manual_seed(0)
        if args.unet:
            base_unet = load_unet(args.unet, args.classes).to(device).eval()
            schedule = load_noise_scheduler(args.unet)
        else:
            base_unet, schedule = create_unet(preset, args.classes).to(device).eval(), None
        size = int(base_unet.config.sample_size)
        if args.guide:
            classifier, guide_cfg, _ = load_classifier_run(args.guide)
            classifier, size = classifier.to(device), guide_cfg.data.image_size
        else:
            classifier = timm.create_model("resnet18", pretrained=False, num_classes=args.classes).to(device).eval()
        preset = "trained " + str(base_unet.config.sample_size) + "px" if args.unet else preset
        labels = [i % args.classes for i in range(2 * args.batch)]  # image i: same label and seed in every variant
        seeds = list(range(2 * args.batch))
        # The reference: fp32 explicitly (the default is bf16 where the device has it natively).
        guided = SamplerConfig(steps=args.steps, guidance_scale=1.0, dtype="float32")
        references = {}

        def variant(title, cfg=guided, unet=base_unet, batch=args.batch):
            images, rate = run(unet, classifier, cfg, labels[:batch], seeds[:batch], device, schedule,
                               output_size=size)
            ref = references.setdefault("fp32", images)  # the first variant: fp32, DDIM, all steps, guided
            n = min(len(images), len(ref))
            diff = (images[:n].int() - ref[:n].int()).abs()
            diff = f"{diff.max().item()} (mean {diff.float().mean().item():.1f})"
            gflop = gflop_per_image(unet, classifier, cfg, min(batch, 8), device, size)
            tflops = gflop * rate / 1e3
            quality = ""
            if judge is not None:
                _, p = predict(judge, [{"image": images, "label": torch.tensor(labels[:len(images)])}], device)
                y = np.asarray(labels[:len(images)])
                quality = f" {np.mean([(p.argmax(1)[y == c] == c).mean() for c in np.unique(y)]):.3f} |"
            print(f"| {preset} | {title} | {batch} | {cfg.steps} | {rate:.2f} | {gflop:.2f} | {tflops:.3f} | "
                  f"{100 * tflops / peak:.1f} | {diff} |{quality}", flush=True)

        variant("fp32, DDIM, guided x_t (reference)")
        variant("unguided", dataclasses.replace(guided, guidance_scale=0.0))
        variant("bf16 autocast", dataclasses.replace(guided, dtype="bfloat16"))
        variant("channels_last", unet=copy.deepcopy(base_unet).to(memory_format=torch.channels_last))
        classic = copy.deepcopy(base_unet)
        from diffusers.models.attention_processor import Attention, AttnProcessor

        for module in classic.modules():  # diffusers' default is AttnProcessor2_0, i.e. SDPA
            if isinstance(module, Attention):
                module.set_processor(AttnProcessor())
        variant("attention without SDPA", unet=classic)
        for b in (max(1, args.batch // 4), args.batch * 2):
            variant(f"batch {b}", batch=b)
        fewer = max(1, args.steps * 2 // 5)
        variant(f"DDIM {fewer} steps", dataclasses.replace(guided, steps=fewer))
        for solver in ("dpmsolver++", "unipc"):
            variant(f"{solver} {fewer} steps", dataclasses.replace(guided, steps=fewer, solver=solver))
        if args.compile:
            compiled = copy.deepcopy(base_unet)
            compiled.forward = torch.compile(compiled.forward)
            variant("torch.compile(UNet)", unet=compiled)


if __name__ == "__main__":
    main()
