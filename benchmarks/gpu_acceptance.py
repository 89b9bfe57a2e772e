"""The GPU acceptance run (issue 18): one script that proves the GPU path on a machine with a CUDA GPU,
in under 8 minutes, offline, without ../shared/data (embedded digits, random-weight models).

    python benchmarks/gpu_acceptance.py --out /tmp/gpu_acceptance      # on a GPU machine
    python benchmarks/gpu_acceptance.py --cpu-dry-run                  # the same checks, tiny, on CPU

Checks, each PASS / FAIL / SKIP with a reason, then a table of numbers:
  a) `ioisray train` IOIS, 2 epochs, small64 at 64 px, ray.use_gpu=true: one NCCL worker and one synthesis
     actor sharing the GPU (half each) finish with test metrics;
  b) the same with 2 training workers, when 2 or more GPUs are present;
  c) guided DDIM-50 throughput of small64 and adm128: fp32, bf16, bf16 + torch.compile (images/s, and
     the share of the GPU's bf16 peak, measured by a matmul in the same run);
  d) ResNet-50 training at 224: fp32 against bf16 (images/s);
  e) peak GPU memory of each process (training workers and synthesis actors from a) and b), this
     process for c) and d)).
The dry run uses the tiny preset, a small classifier and few steps, trains in-process, and compiles
with the "eager" backend: it checks that the script runs, not speed.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from ioisray.models.diffusion import create_unet, save_diffusion_model  # noqa: E402
from ioisray.sampler import SamplerConfig, make_train_scheduler, sample  # noqa: E402
from synthesis import gflop_per_image  # noqa: E402


class Report:
    def __init__(self):
        self.checks, self.rows = [], []

    def check(self, name: str, status: str, detail: str = "") -> None:
        self.checks.append({"check": name, "status": status, "detail": detail})
        print(f"{status}: {name}" + (f" ({detail})" if detail else ""), flush=True)

    def row(self, **values) -> None:
        self.rows.append(values)
        print("  " + ", ".join(f"{k} {v}" for k, v in values.items()), flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bf16_peak_tflops(device: torch.device) -> float:
    """A large bf16 matmul's rate: the share of peak below is relative to it (fp32 on the CPU)."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps, start = 20 if device.type == "cuda" else 3, time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def peak_memory_mb(device: torch.device):
    """This process's peak CUDA memory so far, MB (None on the CPU)."""
    return round(torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else None


# -- a), b): ioisray train on the GPU ---------------------------------------------------------------


def check_train(report: Report, args, workers: int, out: Path) -> None:
    name = f"a) ioisray train IOIS, {workers} worker(s)" if workers == 1 else "b) ioisray train IOIS, 2 workers"
    size, preset = (16, "tiny") if args.cpu_dry_run else (64, "small64")
    unet_dir = out / f"unet_{preset}"
    if not unet_dir.exists():
        torch.manual_seed(0)
        save_diffusion_model(create_unet(preset, 10, size), make_train_scheduler("squaredcos_cap_v2", "v_prediction"),
                             unet_dir)
    overrides = [f"output_dir={out}", f"name=iois_{workers}w", "baseline=null", "train.epochs=2",
                 f"data.image_size={size}", f"diffusion.preset={preset}", f"diffusion.image_size={size}",
                 f"diffusion.model_dir={unet_dir}", "synthesis.chunk_size=16"]
    if args.cpu_dry_run:
        overrides += ["ray.num_workers=0", "model.name=resnet10t", "synthesis.budget=8", "synthesis.pool_size=1",
                      "synthesis.num_cpus=0.5", "sampler.steps=2", "train.batch_size=32"]
    else:
        overrides += [f"ray.num_workers={workers}", "ray.use_gpu=true", "ray.cpus_per_worker=2",
                      "ray.resources_per_worker={GPU: 0.5}", f"synthesis.pool_size={workers}",
                      "synthesis.num_gpus=0.5", "synthesis.num_cpus=2", "synthesis.budget=128", "sampler.steps=20",
                      "train.batch_size=64"]
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ioisray", "train", "configs/digits.yaml", *overrides], cwd=ROOT,
                          capture_output=True, text=True, timeout=args.train_timeout,
                          env={**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"})
    seconds = time.perf_counter() - started
    (out / f"train_{workers}w.log").write_text(proc.stdout + proc.stderr)
    metrics_file = out / f"iois_{workers}w" / "metrics.json"
    if proc.returncode != 0 or not metrics_file.is_file():
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or ["no output"]
        report.check(name, "FAIL", f"rc {proc.returncode}: {tail[0][:200]} (log: {out}/train_{workers}w.log)")
        return
    results = json.loads(metrics_file.read_text())
    bacc = results["test"]["balanced_accuracy"]
    last = results["history"][-1]
    received = sum(last.get("synthetic_per_class", []))
    ok = math.isfinite(bacc) and received == sum(last.get("quotas", [-1]))
    report.check(name, "PASS" if ok else "FAIL", f"test BACC {bacc:.3f}, {received} synthetic images in the last "
                                                  f"epoch, {seconds:.0f} s")
    report.row(check=name[:2], seconds=round(seconds), test_bacc=round(bacc, 4),
               worker_gpu_memory_mb=last.get("gpu_memory_mb"), actor_gpu_memory_mb=last.get("actor_gpu_memory_mb"),
               synthesis_images_per_s=last.get("images_per_second_per_actor"))


# -- c): the sampler ------------------------------------------------------------------------------


def check_sampler(report: Report, args, device: torch.device, peak: float) -> None:
    import timm

    presets = [("tiny", 16, 8, 2)] if args.cpu_dry_run else [("small64", 64, 64, 50), ("adm128", 128, 32, 50)]
    for preset, size, batch, steps in presets:
        torch.manual_seed(0)
        unet = create_unet(preset, 7, size).to(device).eval()
        guide = timm.create_model("resnet10t" if args.cpu_dry_run else "resnet50", num_classes=7).to(device).eval()
        labels, seeds = [i % 7 for i in range(batch)], list(range(batch))
        for variant, dtype, compiled in (("fp32", "float32", False), ("bf16", "bfloat16", False),
                                         ("bf16 + compile", "bfloat16", True)):
            cfg = SamplerConfig(steps=steps, guidance_scale=1.0, dtype=dtype, compile=compiled)
            model = torch.compile(unet, backend=args.compile_backend) if compiled else unet
            try:
                torch.cuda.reset_peak_memory_stats(device) if device.type == "cuda" else None
                warm = time.perf_counter()
                sample(model, labels, seeds, dataclasses.replace(cfg, steps=2), classifier=guide, device=device,
                       output_size=size)  # warm-up, and compilation for the compiled variant
                sync(device)
                warm = time.perf_counter() - warm
                start = time.perf_counter()
                images = sample(model, labels, seeds, cfg, classifier=guide, device=device, output_size=size).images
                sync(device)
                rate = batch / (time.perf_counter() - start)
            except Exception as e:  # noqa: BLE001 - a failed variant is reported, the others still run
                report.check(f"c) sampler {preset} {variant}", "FAIL", f"{type(e).__name__}: {str(e)[:200]}")
                continue
            gflop = gflop_per_image(unet, guide, cfg, min(batch, 4), device, size)
            share = 100 * gflop * rate / 1e3 / peak
            ok = images.shape == (batch, size, size, 3)
            report.check(f"c) sampler {preset} {variant}", "PASS" if ok else "FAIL",
                         f"{rate:.1f} images/s, {share:.0f}% of the bf16 peak")
            report.row(check="c", preset=preset, variant=variant, batch=batch, steps=steps, images_per_s=round(rate, 2),
                       gflop_per_image=round(gflop, 1), percent_of_peak=round(share, 1), warmup_s=round(warm, 1),
                       gpu_memory_mb=peak_memory_mb(device))


# -- d): classifier training ----------------------------------------------------------------------


def check_training_step(report: Report, args, device: torch.device) -> None:
    import timm

    from ioisray.precision import autocast, grad_scaler

    name, size, batch, steps = ("resnet10t", 32, 16, 3) if args.cpu_dry_run else ("resnet50", 224, 128, 30)
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=7).to(device).to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        scaler = grad_scaler(device, precision)
        x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 7, (batch,), device=device)

        def step():
            with autocast(device, precision):
                loss = torch.nn.functional.cross_entropy(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            return loss

        for _ in range(3):
            step()
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            loss = step()
        sync(device)
        rate = steps * batch / (time.perf_counter() - start)
        ok = math.isfinite(loss.item())
        report.check(f"d) {name} training at {size}, {precision}", "PASS" if ok else "FAIL", f"{rate:.0f} images/s")
        report.row(check="d", model=name, precision=precision, batch=batch, images_per_s=round(rate, 1),
                   gpu_memory_mb=peak_memory_mb(device))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-dry-run", action="store_true", help="the same checks at tiny sizes on the CPU")
    ap.add_argument("--out", type=Path, help="where runs, logs and results.json go (default: a temporary folder)")
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend (default: inductor; eager in the dry run)")
    ap.add_argument("--train-timeout", type=int, default=240)
    ap.add_argument("--skip", default="", help="comma-separated checks to leave out, e.g. b,d")
    args = ap.parse_args()
    args.compile_backend = args.compile_backend or ("eager" if args.cpu_dry_run else "inductor")
    warnings.filterwarnings("ignore", module=r"torch\._dynamo.*")  # tracing diffusers' UNet is chatty
    out = args.out or Path(tempfile.mkdtemp(prefix="gpu-acceptance-"))
    out.mkdir(parents=True, exist_ok=True)
    report = Report()
    gpus = torch.cuda.device_count()
    if not args.cpu_dry_run and gpus == 0:
        print("FAIL: no CUDA GPU here; use --cpu-dry-run to check the script on a CPU")
        return 1
    device = torch.device("cpu" if args.cpu_dry_run else "cuda")
    if args.cpu_dry_run:
        torch.set_num_threads(2)
    skip = set(args.skip.split(",")) - {""}
    started = time.perf_counter()
    where = "CPU dry run" if args.cpu_dry_run else f"{gpus} x {torch.cuda.get_device_name(0)}"
    print(f"gpu_acceptance on {where}; torch {torch.__version__}; results in {out}", flush=True)
    peak = bf16_peak_tflops(device)
    report.row(check="peak", device=where, bf16_matmul_tflops=round(peak, 1))
    if "a" not in skip:
        check_train(report, args, 1, out)
    if "b" not in skip:
        if args.cpu_dry_run or gpus < 2:
            report.check("b) ioisray train IOIS, 2 workers", "SKIP",
                         "the dry run trains in-process" if args.cpu_dry_run else f"{gpus} GPU here, it needs 2")
        else:
            check_train(report, args, 2, out)
    if "c" not in skip:
        check_sampler(report, args, device, peak)
    if "d" not in skip:
        check_training_step(report, args, device)
    report.row(check="e", this_process_gpu_memory_mb=peak_memory_mb(device),
               seconds=round(time.perf_counter() - started))
    (out / "results.json").write_text(json.dumps({"device": where, "checks": report.checks, "rows": report.rows},
                                                 indent=1))
    failed = [c["check"] for c in report.checks if c["status"] == "FAIL"]
    print(f"\n{len(report.checks) - len(failed)} of {len(report.checks)} checks passed or skipped with a reason"
          + (f"; FAILED: {', '.join(failed)}" if failed else "") + f"; {time.perf_counter() - started:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
