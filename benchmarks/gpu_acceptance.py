"""The first run on a GPU machine: one command, within a time budget (default 540 s, for a 10-minute
call), that checks ioisray's GPU paths and measures them against stated goals.

    python benchmarks/gpu_acceptance.py --out /tmp/acceptance         # on a machine with CUDA GPUs
    python benchmarks/gpu_acceptance.py --cpu-dry-run --out /tmp/dry   # the same checks, tiny, on the CPU

The checks, in this order, each PASS / FAIL / SKIPPED with its figure and its goal. The speed goals are
benchmark goals for an H100-class GPU: a check that misses one is a FAIL, and the script goes on.
  classifier_training  ResNet-50 at 224 px, bf16, channels-last, through engine.train_one_epoch with the
                       real training transforms: >= 3,000 images/s
  sampling_small64     guided DDIM-50 with small64 (64 px images, ResNet-50 guide), bf16 + torch.compile,
                       through the synthesis actors' DiffusionGenerator: >= 200 images/s
  sampling_adm128      the same with adm128 (images for a 224 px ResNet-50): >= 18 images/s
  iois_epoch           `ioisray train` IOIS through Ray Train on 1 GPU (the worker and a synthesis actor
                       half of it each), a real NCCL all-reduce in the worker even at world size 1; stopped
                       like Ctrl-C once its first epoch is checkpointed
  iois_resume          the same command again: it must resume from that checkpoint and train the rest
  iois_two_workers     2 Ray Train workers on a whole GPU each (two NCCL ranks on one GPU fail); only with
                       2 or more GPUs, otherwise SKIPPED with the reason

Each check runs in a process of its own, stopped at its share of what is left of the budget. results.json
in --out is rewritten (atomically) whenever a check starts, measures or ends, so whatever stops the
script, it holds what was measured; a check that timed out is a FAIL that keeps its partial figures.
Runs and models go to --work (default: a temporary folder), logs to --out/logs.
`--cpu-dry-run` runs the same functions at tiny sizes (tiny preset, resnet10t, gloo instead of NCCL,
torch.compile's eager backend; sampling_adm128 would sample the same tiny model again and is skipped)
and judges that each check works, not its speed.
Before anything runs, a missing package (ray, diffusers, pydantic, ...) is named in one line.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from ioisray.atomic import atomic_write_text  # noqa: E402 - standard library only

# -- what must be importable ------------------------------------------------------------------------

# The GPU machine's image has torch and timm; the device bundle brings these (and their own dependencies).
BUNDLE = ("ray", "diffusers", "pydantic")
BUNDLE_MODULES = {*BUNDLE, "pydantic_core", "annotated_types", "typing_inspection", "typing_extensions",
                  "jsonschema", "jsonschema_specifications", "referencing", "rpds", "importlib_metadata"}
# pyproject.toml's dependencies by import name, then the modules the checks run (whose own imports name
# a missing dependency of a dependency).
PACKAGES = ("torch", "timm", "numpy", "ray", "diffusers", "pydantic", "yaml", "pyarrow", "safetensors", "PIL",
            "sklearn", "matplotlib", "tensorboard")
MODULES = ("ray.train.torch", "ray.data", "ioisray.cli", "ioisray.recipes.train", "ioisray.engine",
           "ioisray.synthesis.generator", "ioisray.synthesis.pool", "ioisray.synthesis.stream", "synthesis")


def unimportable() -> tuple[list[str], list[str]]:
    """(missing top-level modules, other import errors) among what the checks import."""
    missing, broken = [], []
    for name in (*PACKAGES, *MODULES):
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            top = (e.name or name).split(".")[0]
            if top not in missing:
                missing.append(top)
        except ImportError as e:
            broken.append(f"{name} ({str(e).splitlines()[0][:120]})")
    return sorted(missing), broken


def unimportable_line(missing: list[str], broken: list[str]) -> str:
    """One line: what is missing, and what provides it."""
    from_bundle = [m for m in missing if m in BUNDLE_MODULES]
    others = [m for m in missing if m not in BUNDLE_MODULES]
    parts = ([f"{', '.join(from_bundle)} - install the device bundle ({', '.join(BUNDLE)}) first"] if from_bundle else [])
    parts += [f"{', '.join(others)} - pip install them (dependencies in pyproject.toml)"] if others else []
    line = "gpu_acceptance: " + (f"missing python packages: {'; '.join(parts)}" if parts else "")
    return line + ("; " if parts and broken else "") + (f"cannot import {', '.join(broken)}" if broken else "")


# -- the checks -------------------------------------------------------------------------------------

# configs/digits.yaml's classes, in every check: the IOIS runs then use the small64 model the sampling
# check saved (and compiled: inductor's cache has its graph when their actors compile it).
NUM_CLASSES = 10
IOIS_EPOCHS = 3  # the first run is stopped after its first epoch: two are left for the resume to train


@dataclass(frozen=True)
class Check:
    id: str
    title: str
    weight: float  # its share of the time budget, relative to the checks still to run
    goal: str
    minimum: Optional[float] = None  # the speed goal: the figure must reach it (GPU runs only)
    unit: str = ""
    in_child: bool = True  # measured in a child process; False: it drives `ioisray train` processes itself


CHECKS = (
    Check("classifier_training", "ResNet-50 bf16 training at 224 px through train_one_epoch, real transforms",
          1.5, ">= 3,000 images/s on an H100-class GPU", 3000.0, "images/s"),
    Check("sampling_small64", "guided DDIM-50 with small64, bf16 + torch.compile, batch 64",
          2.0, ">= 200 images/s on an H100-class GPU", 200.0, "images/s"),
    Check("sampling_adm128", "guided DDIM-50 with adm128 (224 px ResNet-50 guide), bf16 + torch.compile, batch 64",
          3.0, ">= 18 images/s on an H100-class GPU", 18.0, "images/s"),
    Check("iois_epoch", "ioisray train IOIS through Ray Train on 1 GPU, NCCL all-reduce at world size 1",
          3.0, "its first epoch checkpointed, every synthetic image delivered, the all-reduce sums to 1",
          unit="s to the first checkpoint", in_child=False),
    Check("iois_resume", "the same run again: resumes from its checkpoint and trains the other epochs",
          2.0, f"resumes from epoch >= 1 and finishes all {IOIS_EPOCHS} epochs with finite test metrics",
          unit="test balanced accuracy", in_child=False),
    Check("iois_two_workers", "ioisray train IOIS on 2 Ray Train workers, one whole GPU each",
          3.0, "finishes; the all-reduce sums to 2 on two different GPUs", unit="test balanced accuracy",
          in_child=False),
)
BY_ID = {c.id: c for c in CHECKS}

# Sampling checks: preset, guide, classifier input size, batch, DDIM steps, timed batches; the dry run
# samples the tiny preset.
SAMPLING = {"sampling_small64": ("small64", "resnet50", 64, 64, 50, 2),
            "sampling_adm128": ("adm128", "resnet50", 224, 64, 50, 1)}
SAMPLING_DRY = ("tiny", "resnet10t", 16, 8, 2, 1)
DRY_RUN_SKIPS = {"sampling_adm128": "the dry run samples the tiny preset once, in sampling_small64",
                 # A stopped run resuming through Ray Train is tested on the CPU by tests/test_job.py and
                 # tests/test_tune_cli.py; a second Ray start here would put the suite past its 15 minutes.
                 "iois_resume": "a stopped IOIS run resuming is the suite's job and Tune tests' on the CPU"}

RESERVE_S = 5.0  # of the budget, kept for the last write of results.json
TRAIN_GRACE_S = 30.0  # for a stopped `ioisray train` to shut its Ray down after Ctrl-C
CHILD_GRACE_S = 5.0  # for a stopped measurement process
MIN_CHECK_S = 15.0  # a check with less time than this is not started


class Results:
    """results.json: the run's header and one entry per check, each with a status (NOT RUN, RUNNING,
    PASS, FAIL, SKIPPED). Whichever process runs a check updates it (one process at a time); every
    write replaces the file atomically."""

    def __init__(self, path: Path):
        self.path = path

    def create(self, header: dict, checks: list[Check]) -> None:
        self._write({**header, "checks": [{"check": c.id, "title": c.title, "goal": c.goal, "unit": c.unit,
                                           "status": "NOT RUN"} for c in checks]})

    def read(self) -> dict:
        return json.loads(self.path.read_text())

    def entry(self, check: str) -> dict:
        return next(c for c in self.read()["checks"] if c["check"] == check)

    def update(self, check: str, figures: Optional[dict] = None, **fields) -> dict:
        data = self.read()
        entry = next(c for c in data["checks"] if c["check"] == check)
        entry.update(fields)
        if figures:
            entry["figures"] = {**entry.get("figures", {}), **figures}
        self._write(data)
        return entry

    def _write(self, data: dict) -> None:
        data["written_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
        atomic_write_text(self.path, json.dumps(data, indent=1) + "\n")


def judge(check: Check, works: bool, why_not: str, value: Optional[float], dry_run: bool) -> dict:
    """Status and detail of a finished measurement: it must work, and on a GPU reach its speed goal."""
    if not works:
        return {"status": "FAIL", "detail": why_not}
    if check.minimum is None:
        return {"status": "PASS"}
    if dry_run:
        return {"status": "PASS", "detail": "speed goal not judged in the CPU dry run"}
    if value is None or value < check.minimum:
        return {"status": "FAIL", "detail": f"{value} {check.unit} is below the goal ({check.goal})"}
    return {"status": "PASS"}


@dataclass
class Context:
    dry_run: bool
    out: Path
    work: Path
    gpus: int
    results: Results
    compile_backend: str

    @property
    def device(self):
        import torch

        return torch.device("cpu") if self.dry_run else torch.device("cuda", 0)


def reset_peak_memory(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device) -> Optional[int]:
    import torch

    return round(torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else None


def random_unet(ctx: Context, preset: str, size: Optional[int], device: str | object = "cpu") -> Path:
    """A diffusion model with random weights (speed and plumbing do not depend on them) and
    configs/digits.yaml's noise schedule, saved once per preset and size (None: the preset's)."""
    import torch

    from ioisray.models.diffusion import PRESETS, create_unet, save_diffusion_model
    from ioisray.sampler import make_train_scheduler

    path = ctx.work / f"unet_{preset}_{size or PRESETS[preset]['sample_size']}px"
    if not path.is_dir():
        torch.manual_seed(0)
        with torch.device(device):  # made where it is made fast (adm128 has 385M parameters)
            unet = create_unet(preset, NUM_CLASSES, size)
        save_diffusion_model(unet.cpu(), make_train_scheduler("squaredcos_cap_v2", "v_prediction"), path)
    return path


# classifier_training ---------------------------------------------------------------------------------


def training_config(dry_run: bool):
    """(config, warm-up batches, timed batches) of classifier_training: HAM10000's ResNet-50 at 224 px with
    its augmentation, bf16 and channels-last, in batches of 256."""
    from ioisray.config import Config

    name, size, batch, warm, timed = ("resnet10t", 32, 16, 2, 3) if dry_run else ("resnet50", 224, 256, 8, 30)
    return Config(model={"name": name}, data={"image_size": size},
                  train={"batch_size": batch, "precision": "bf16", "channels_last": True,
                         "augment": {"crop_scale": [0.7, 1.0], "hflip": True, "vflip": True}}), warm, timed


def measure_training(ctx: Context, check: Check) -> None:
    """ResNet-50 training as a worker trains: the run's classifier, optimizer, loss, transforms and
    precision, configure_device, then engine.train_one_epoch over pinned uint8 batches."""
    import torch

    from ioisray.engine import train_one_epoch
    from ioisray.models import build_classifier
    from ioisray.precision import configure_device, grad_scaler, resolve_precision
    from ioisray.training import build_loss, build_optimizer
    from ioisray.transforms import TrainTransform

    cfg, warm, timed = training_config(ctx.dry_run)
    name, size, batch = cfg.model.name, cfg.data.image_size, cfg.train.batch_size
    device = ctx.device
    configure_device(device)
    reset_peak_memory(device)
    torch.manual_seed(0)
    model = build_classifier(cfg, NUM_CLASSES)
    optimizer, _ = build_optimizer(cfg, model)
    loss_fn = build_loss(cfg, [100] * NUM_CLASSES).to(device)
    precision = resolve_precision(cfg.train.precision, device)
    model = model.to(memory_format=torch.channels_last).to(device)
    transform = TrainTransform(size, cfg.train.augment)
    pin = device.type == "cuda"  # as Ray Data hands batches to a GPU worker (recipes/worker.cpu_batches)
    batches = [{"image": torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8),
                "label": torch.randint(0, NUM_CLASSES, (batch,))} for _ in range(4)]
    batches = [{k: v.pin_memory() if pin else v for k, v in b.items()} for b in batches]

    def epoch(n: int):
        return train_one_epoch(model, (batches[i % len(batches)] for i in range(n)), loss_fn, optimizer, transform,
                               NUM_CLASSES, device, precision=precision, scaler=grad_scaler(device, precision),
                               channels_last=True)

    epoch(warm)  # cuDNN's autotuning (configure_device turns it on) happens here
    reset_peak_memory(device)
    stats = epoch(timed)
    images = int(stats.total.sum())
    rate = images / stats.seconds
    works = math.isfinite(stats.loss) and images == timed * batch
    ctx.results.update(check.id, value=round(rate, 1), gpu_memory_mb=peak_memory_mb(device),
                       figures={"model": name, "image_size": size, "batch": batch, "precision": precision,
                                "images": images, "seconds": round(stats.seconds, 2), "loss": round(stats.loss, 4)},
                       **judge(check, works, f"loss {stats.loss}, {images} of {timed * batch} images counted",
                               rate, ctx.dry_run))


# sampling_small64, sampling_adm128 --------------------------------------------------------------------


def sampling_config(check_id: str, dry_run: bool):
    """(config, timed chunks) of a sampling check: the actors' settings for its preset (synthesis.chunk_size
    images per call), DDIM guided by a random-weight classifier at its input size."""
    from ioisray.config import Config

    preset, guide, size, batch, steps, repeats = SAMPLING_DRY if dry_run else SAMPLING[check_id]
    return Config(model={"name": guide}, data={"image_size": size}, diffusion={"preset": preset},
                  sampler={"steps": steps, "guidance_scale": 1.0, "dtype": "bfloat16", "compile": True},
                  synthesis={"mode": "online", "budget": batch, "chunk_size": batch, "num_gpus": 0 if dry_run else 1,
                             "num_cpus": 2}), repeats


def measure_sampling(ctx: Context, check: Check) -> None:
    """Guided sampling as a synthesis actor samples: its DiffusionGenerator (configure_device, bf16,
    the UNet compiled with a dynamic batch) loads a saved model, takes the guide's weights, makes one
    chunk (compiling), then the timed chunks."""
    import numpy as np

    from ioisray.models import build_classifier
    from ioisray.synthesis.generator import generator_factory
    from synthesis import gflop_per_image, measured_peak_tflops

    cfg, repeats = sampling_config(check.id, ctx.dry_run)
    preset, guide, size = cfg.diffusion.preset, cfg.model.name, cfg.data.image_size
    batch, steps = cfg.synthesis.chunk_size, cfg.sampler.steps
    device = ctx.device
    reset_peak_memory(device)
    started = time.perf_counter()
    unet_dir = random_unet(ctx, preset, 16 if ctx.dry_run else None, device)  # the dry run's: the IOIS runs'
    generator = generator_factory(cfg, str(unet_dir), NUM_CLASSES)(compile_backend=ctx.compile_backend)
    generator.set_classifier(build_classifier(cfg, NUM_CLASSES, pretrained=False).state_dict())
    ready = time.perf_counter() - started
    labels = np.arange(batch) % NUM_CLASSES
    first = generator.generate(labels, np.arange(batch))
    ctx.results.update(check.id, figures={"preset": preset, "guide": guide, "image_size": size, "batch": batch,
                                          "steps": steps, "model_ready_s": round(ready, 1),
                                          "first_chunk_s": round(first["seconds"], 1)})
    reset_peak_memory(device)
    seconds = [generator.generate(labels, np.arange(batch) + batch * (i + 1))["seconds"] for i in range(repeats)]
    rate = batch * repeats / sum(seconds)
    unet = getattr(generator.unet, "_orig_mod", generator.unet)  # FLOPs counted on the eager module
    gflop = gflop_per_image(unet, generator.classifier, generator.sampler, min(batch, 4), device, size)
    peak = measured_peak_tflops(device, n=256 if ctx.dry_run else None)
    works = first["image"].shape == (batch, size, size, 3) and first["image"].dtype == np.uint8
    ctx.results.update(check.id, value=round(rate, 2), gpu_memory_mb=peak_memory_mb(device),
                       figures={"gflop_per_image": round(gflop, 1), "percent_of_peak": round(
                           100 * gflop * rate / 1e3 / peak, 1), "matmul_peak_tflops": round(peak, 3)},
                       **judge(check, works, f"images of shape {first['image'].shape}", rate, ctx.dry_run))


IN_CHILD: dict[str, Callable[[Context, Check], None]] = {
    "classifier_training": measure_training, "sampling_small64": measure_sampling, "sampling_adm128": measure_sampling}


# iois_epoch, iois_resume, iois_two_workers ------------------------------------------------------------

# Set by `probed_train` in the process that runs `ioisray train`; the wrapped training loop carries them
# to the workers (cloudpickle sends a function of __main__ by value, with the globals it uses).
PROBE_DIR: Optional[str] = None
TRAIN_LOOP: Optional[Callable[[dict], None]] = None


def _collectives_so_far(group) -> Optional[int]:
    try:
        return int(group._get_sequence_number_for_group())
    except (AttributeError, RuntimeError):
        return None


def all_reduce_then_train(loop_config: dict) -> None:
    """The recipe's training loop, after one all-reduce in the process group Ray Train made for it. That
    group is NCCL on a GPU (gloo on the CPU) even for one worker, where ioisray itself needs no
    collective; what happened is written to PROBE_DIR/rank_<rank>.json, with, once the loop has
    ended, how many collectives the loop ran."""
    import torch
    import torch.distributed as dist

    from ioisray.distributed import group_device

    probe: dict = {"process_group": dist.is_available() and dist.is_initialized()}
    group, before = None, None
    if probe["process_group"]:
        device = group_device()
        ones = torch.ones(1, device=device)
        dist.all_reduce(ones)
        probe.update(rank=dist.get_rank(), world_size=dist.get_world_size(), backend=str(dist.get_backend()),
                     device=str(device), all_reduce_sum=float(ones.item()))
        if device.type == "cuda":
            probe["gpu_uuid"] = str(torch.cuda.get_device_properties(device).uuid)
        group = dist.distributed_c10d._get_default_group()
        before = _collectives_so_far(group)
    path = Path(PROBE_DIR) / f"rank_{probe.get('rank', 0)}.json"
    atomic_write_text(path, json.dumps(probe))
    TRAIN_LOOP(loop_config)
    if group is not None:
        after = _collectives_so_far(group)
        probe["collectives_in_training"] = after - before if None not in (before, after) else None
        atomic_write_text(path, json.dumps(probe))


def probed_train(probe_dir: str, overrides: list[str]) -> int:
    """`ioisray train configs/digits.yaml OVERRIDES`, its workers running all_reduce_then_train."""
    global PROBE_DIR, TRAIN_LOOP
    from ioisray import cli
    from ioisray.recipes import train as recipe

    PROBE_DIR, TRAIN_LOOP = probe_dir, recipe.train_loop_per_worker
    recipe.train_loop_per_worker = all_reduce_then_train
    return cli.main(["train", str(ROOT / "configs" / "digits.yaml"), *overrides])


def two_worker_overrides(gpus: int) -> list[str]:
    """Ray settings of the two-worker run on `gpus` GPUs: each Train worker holds a whole GPU, so that
    Ray never places the two NCCL ranks on one GPU (NCCL fails on that: "Duplicate GPU detected"). The
    synthesis actors take the GPUs left over, or CPUs when there are none."""
    if gpus < 2:
        raise ValueError(f"two NCCL workers need 2 GPUs, this machine has {gpus}")
    synthesis = ([f"synthesis.pool_size={min(gpus - 2, 2)}", "synthesis.num_gpus=1"] if gpus > 2 else
                 ["synthesis.pool_size=1", "synthesis.num_gpus=0", "synthesis.num_cpus=4", "synthesis.budget=32",
                  "sampler.steps=4"])
    return ["ray.num_workers=2", "ray.use_gpu=true", "ray.resources_per_worker={}", *synthesis]


def _child_setup() -> None:
    """In a started process, before it runs: SIGINT back to its default (a script started in the background
    inherits it ignored, and Ctrl-C would then be lost), and killed if this script dies (its own session
    keeps it from a Ctrl-C or a kill meant for this script alone; Ray's processes die with it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Process:
    """A command in a session of its own, its output in a log file; stopped like Ctrl-C, and then, with
    every process it started, killed."""

    def __init__(self, cmd: list[str], log: Path, env: dict):
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True, preexec_fn=_child_setup)

    def wait(self, timeout: float, until: Optional[Callable[[], bool]] = None) -> str:
        """"exited", "until" (the condition holds) or "timeout", whichever comes first."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                return "exited"
            if until is not None and until():
                return "until"
            if time.monotonic() >= deadline:
                return "timeout"
            time.sleep(0.2)

    def stop(self, grace: float) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        try:  # what is left of it: the process, if Ctrl-C did not end it, and whatever it started
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()

    @property
    def returncode(self) -> Optional[int]:
        return self.proc.returncode

    def last_line(self) -> str:
        lines = [line for line in self.log.read_text(errors="replace").splitlines() if line.strip()]
        return lines[-1][:300] if lines else "no output"


def child_env() -> dict:
    """What every process the script starts gets: this checkout importable (Ray's workers too), Ray's token
    authentication off (a private local Ray), output unbuffered."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


@dataclass
class IOISRun:
    """One `ioisray train` IOIS run of the digits, its folder and its workers' probe files."""

    ctx: Context
    name: str
    overrides: list[str]

    @property
    def dir(self) -> Path:
        return self.ctx.work / "runs" / self.name

    @property
    def probes(self) -> Path:
        return self.ctx.work / "probes" / self.name

    def start(self, log: str) -> Process:
        shutil.rmtree(self.probes, ignore_errors=True)
        self.probes.mkdir(parents=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--probed-train", str(self.probes), *self.overrides]
        return Process(cmd, self.ctx.out / "logs" / f"{log}.log", child_env())

    def epochs_saved(self) -> int:
        from ioisray.checkpoint import CheckpointStore

        return CheckpointStore(str(self.dir / "checkpoints")).latest_epoch()

    def history(self) -> list[dict]:
        """The epochs of the newest checkpoint's history (train.py keeps one entry per epoch)."""
        from ioisray.checkpoint import CheckpointStore

        store = CheckpointStore(str(self.dir / "checkpoints"))
        names = store.names()
        return store.load(names[-1]).extra.get("history", []) if names else []

    def metrics(self) -> Optional[dict]:
        path = self.dir / "metrics.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def probe(self, world: int) -> tuple[bool, str, list[dict]]:
        """Whether every worker ran its all-reduce on the expected backend and device, and it summed to
        the world size (and, on GPUs, that no two workers shared one)."""
        probes = [json.loads(p.read_text()) for p in sorted(self.probes.glob("rank_*.json"))]
        backend, device = ("gloo", "cpu") if self.ctx.dry_run else ("nccl", "cuda")
        if len(probes) != world or not all(p["process_group"] for p in probes):
            return False, f"{sum(p['process_group'] for p in probes)} of {world} workers had a process group", probes
        wrong = [p for p in probes if p["backend"] != backend or not p["device"].startswith(device)
                 or p["all_reduce_sum"] != world]
        if wrong:
            p = wrong[0]
            return False, (f"rank {p['rank']}: all-reduce on {p['backend']} / {p['device']} gave {p['all_reduce_sum']}, "
                           f"expected {backend} / {device} and {world}"), probes
        if device == "cuda" and len({p.get("gpu_uuid") for p in probes}) < world:
            return False, f"{world} NCCL ranks on fewer GPUs: {[p.get('gpu_uuid') for p in probes]}", probes
        return True, f"all-reduce on {backend} summed to {world}", probes


def iois_overrides(ctx: Context, name: str, workers: int, unet: Path) -> list[str]:
    """`ioisray train configs/digits.yaml` settings of an IOIS check: small64 at 64 px on the GPU (tiny at
    16 px, gloo, in the dry run), IOIS_EPOCHS epochs."""
    common = [f"output_dir={ctx.work / 'runs'}", f"name={name}", "baseline=null", f"diffusion.model_dir={unet}",
              f"train.epochs={IOIS_EPOCHS}"]
    if ctx.dry_run:
        return [*common, "data.image_size=16", "diffusion.preset=tiny", "diffusion.image_size=16",
                "model.name=resnet10t", "train.batch_size=32", "ray.num_workers=1", "ray.use_gpu=false",
                "ray.cpus_per_worker=1", "synthesis.pool_size=1", "synthesis.num_cpus=0.5", "synthesis.budget=8",
                "synthesis.chunk_size=8", "sampler.steps=2"]
    gpu = [*common, "data.image_size=64", "diffusion.preset=small64", "diffusion.image_size=64", "train.batch_size=64",
           "ray.cpus_per_worker=2", "synthesis.num_cpus=2", "synthesis.budget=128", "synthesis.chunk_size=32",
           "sampler.steps=20"]
    if workers == 1:  # the trainer and one synthesis actor share the GPU
        return [*gpu, "ray.num_workers=1", "ray.use_gpu=true", "ray.resources_per_worker={GPU: 0.5}",
                "synthesis.pool_size=1", "synthesis.num_gpus=0.5"]
    return [*gpu, *two_worker_overrides(ctx.gpus)]


def iois_run(ctx: Context, name: str, workers: int) -> IOISRun:
    unet = random_unet(ctx, "tiny", 16) if ctx.dry_run else random_unet(ctx, "small64", 64)
    return IOISRun(ctx, name, iois_overrides(ctx, name, workers, unet))


def epoch_figures(entry: dict) -> dict:
    keys = ("epoch_seconds", "gpu_memory_mb", "actor_gpu_memory_mb", "images_per_second_per_actor")
    out = {k: entry[k] for k in keys if k in entry}
    if "quotas" in entry:
        out.update(quota=sum(entry["quotas"]), synthetic_received=sum(entry.get("synthetic_per_class", [])))
    return out


def all_delivered(entry: dict) -> bool:
    return "quotas" in entry and sum(entry.get("synthetic_per_class", [-1])) == sum(entry["quotas"])


def check_iois_epoch(ctx: Context, check: Check, timeout: float) -> None:
    run = iois_run(ctx, "iois_1gpu", 1)
    shutil.rmtree(run.dir, ignore_errors=True)
    started = time.monotonic()
    proc = run.start("iois_epoch")
    how = proc.wait(timeout, until=lambda: run.epochs_saved() >= 1)
    seconds = time.monotonic() - started
    proc.stop(TRAIN_GRACE_S)  # Ctrl-C, as a user stops a run: iois_resume runs the rest
    saved = run.epochs_saved()
    if saved < 1:
        why = (f"timed out after {timeout:.0f} s" if how == "timeout" else f"rc {proc.returncode}") + \
              f" before the first checkpoint: {proc.last_line()} (log: {proc.log})"
        ctx.results.update(check.id, status="FAIL", detail=why, timed_out=how == "timeout")
        return
    probe_ok, probe_text, probes = run.probe(1)
    first = (run.history() or [{}])[0]
    works = probe_ok and all_delivered(first)
    why = probe_text if not probe_ok else f"{epoch_figures(first)} delivered fewer images than the quotas"
    ctx.results.update(check.id, value=round(seconds, 1), figures={
        "first_epoch": epoch_figures(first), "epochs_saved_when_stopped": saved, "exit_code": proc.returncode,
        "probe": probes, "finished_before_stopped": run.metrics() is not None}, **judge(check, works, why, seconds, ctx.dry_run))


def check_iois_resume(ctx: Context, check: Check, timeout: float) -> Optional[str]:
    """Returns why it was skipped, or None when it ran."""
    run = iois_run(ctx, "iois_1gpu", 1)
    if run.metrics() is not None:
        return "iois_epoch's run finished before it was stopped: nothing left to resume"
    saved = run.epochs_saved()
    if saved < 1:
        return "iois_epoch left no checkpoint to resume from"
    proc = run.start("iois_resume")
    how = proc.wait(timeout)
    proc.stop(TRAIN_GRACE_S)
    log = proc.log.read_text(errors="replace")
    resumed = [int(m) for m in re.findall(r"resumed from epoch (\d+)", log)]
    metrics = run.metrics()
    if how == "timeout" or metrics is None:
        why = f"timed out after {timeout:.0f} s" if how == "timeout" else f"rc {proc.returncode}: {proc.last_line()}"
        ctx.results.update(check.id, status="FAIL", detail=f"{why} (log: {proc.log})", timed_out=how == "timeout",
                           figures={"resumed_from_epoch": resumed[:1], "epochs_saved": run.epochs_saved()})
        return None
    history = metrics.get("history", [])
    bacc = (metrics.get("test") or {}).get("balanced_accuracy", float("nan"))
    probe_ok, probe_text, probes = run.probe(1)
    problems = [text for bad, text in (
        (resumed[:1] != [saved], f"the log says resumed from {resumed or 'no epoch'}, the checkpoint held {saved}"),
        ([h["epoch"] for h in history] != list(range(IOIS_EPOCHS)),
         f"history epochs {[h['epoch'] for h in history]}, expected 0..{IOIS_EPOCHS - 1}"),
        (not math.isfinite(bacc), f"test balanced accuracy {bacc}"),
        (not history or not all_delivered(history[-1]), "the last epoch got fewer synthetic images than its quotas"),
        (not probe_ok, probe_text)) if bad]
    ctx.results.update(check.id, value=round(bacc, 4), figures={
        "resumed_from_epoch": saved, "epochs_trained_after_resume": IOIS_EPOCHS - saved,
        "mean_epoch_seconds": metrics.get("mean_epoch_seconds"), "last_epoch": epoch_figures(history[-1]) if history
        else None, "probe": probes}, **judge(check, not problems, "; ".join(problems), bacc, ctx.dry_run))
    return None


def check_iois_two_workers(ctx: Context, check: Check, timeout: float) -> None:
    run = iois_run(ctx, "iois_2gpu", 2)
    shutil.rmtree(run.dir, ignore_errors=True)
    proc = run.start("iois_two_workers")
    how = proc.wait(timeout)
    proc.stop(TRAIN_GRACE_S)
    metrics = run.metrics()
    if how == "timeout" or metrics is None:
        why = f"timed out after {timeout:.0f} s" if how == "timeout" else f"rc {proc.returncode}: {proc.last_line()}"
        ctx.results.update(check.id, status="FAIL", detail=f"{why} (log: {proc.log})", timed_out=how == "timeout",
                           figures={"epochs_saved": run.epochs_saved()})
        return
    bacc = (metrics.get("test") or {}).get("balanced_accuracy", float("nan"))
    probe_ok, probe_text, probes = run.probe(2)
    history = metrics.get("history", [])
    works = probe_ok and math.isfinite(bacc) and bool(history) and all_delivered(history[-1])
    ctx.results.update(check.id, value=round(bacc, 4), figures={"last_epoch": epoch_figures(history[-1]) if history
                                                                else None, "probe": probes},
                       **judge(check, works, probe_text if not probe_ok else f"test BACC {bacc}, history "
                               f"{[epoch_figures(h) for h in history]}", bacc, ctx.dry_run))


# -- running them -----------------------------------------------------------------------------------


def run_in_child(ctx: Context, check: Check, timeout: float) -> Process:
    """The check in a process of its own (`--check ID`): stopped at `timeout`, what it measured kept.
    Returns the (ended) process."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--check", check.id, "--out", str(ctx.out),
           "--work", str(ctx.work), "--compile-backend", ctx.compile_backend, *(["--cpu-dry-run"] if ctx.dry_run else [])]
    proc = Process(cmd, ctx.out / "logs" / f"{check.id}.log", child_env())
    how = proc.wait(timeout)
    proc.stop(CHILD_GRACE_S)
    if ctx.results.entry(check.id)["status"] == "RUNNING":  # it did not finish its measurement
        why = f"timed out after {timeout:.0f} s" if how == "timeout" else f"rc {proc.returncode}: {proc.last_line()}"
        ctx.results.update(check.id, status="FAIL", detail=f"{why} (log: {proc.log})", timed_out=how == "timeout")
    return proc


def child_main(ctx: Context, check_id: str) -> int:
    import torch

    if ctx.dry_run:
        torch.set_num_threads(2)
    check = BY_ID[check_id]
    IN_CHILD[check_id](ctx, check)
    return 0


def plan(ctx: Context, only: Optional[set[str]]) -> list[tuple[Check, Optional[str]]]:
    """Every check with the reason it will not run (None: it will)."""
    out = []
    for check in CHECKS:
        reason = None
        if only is not None and check.id not in only:
            reason = "not asked for (--checks)"
        elif ctx.dry_run and check.id in DRY_RUN_SKIPS:
            reason = DRY_RUN_SKIPS[check.id]
        elif check.id == "iois_two_workers" and (ctx.dry_run or ctx.gpus < 2):
            reason = (f"needs 2 GPUs (one per NCCL rank), this {'dry run has none' if ctx.dry_run else f'machine has {ctx.gpus}'}")
        out.append((check, reason))
    return out


def print_entry(entry: dict) -> None:
    value = f"{entry['value']} {entry.get('unit', '')}".strip() if entry.get("value") is not None else ""
    parts = [p for p in (value, f"goal: {entry['goal']}" if entry["status"] != "SKIPPED" else "",
                         entry.get("detail", ""), f"{entry['seconds']:.0f} s" if "seconds" in entry else "") if p]
    print(f"{entry['status']:7} {entry['check']}: " + "; ".join(parts), flush=True)


def gpu_names() -> str:
    """The GPUs' names, from nvidia-smi: this process leaves CUDA uninitialised, the GPUs to the checks'
    processes."""
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=30).stdout.split("\n")
    except (OSError, subprocess.TimeoutExpired):
        return "CUDA GPU (no nvidia-smi)"
    names = [n.strip() for n in names if n.strip()]
    return ", ".join(sorted(set(names))) or "CUDA GPU"


def run_all(ctx: Context, budget_s: float, only: Optional[set[str]], started: float) -> int:
    import torch

    where = "CPU dry run" if ctx.dry_run else f"{ctx.gpus} x {gpu_names()}"
    checks = plan(ctx, only)
    ctx.results.create({"device": where, "torch": torch.__version__, "dry_run": ctx.dry_run, "budget_s": budget_s,
                        "work": str(ctx.work)}, [c for c, _ in checks])
    print(f"gpu_acceptance on {where}, torch {torch.__version__}, budget {budget_s:.0f} s; results in "
          f"{ctx.results.path}", flush=True)
    for i, (check, reason) in enumerate(checks):
        check_started = time.monotonic()
        if reason is None:
            # Its share of what is left, by weight among the checks still to run; a stopped process's grace
            # period comes out of its share.
            weights = sum(c.weight for c, r in checks[i:] if r is None)
            left = budget_s - (time.monotonic() - started) - RESERVE_S
            grace = CHILD_GRACE_S if check.in_child else TRAIN_GRACE_S
            timeout = left * check.weight / weights - grace
            if timeout < MIN_CHECK_S:
                reason = f"not run: {max(left, 0):.0f} s of the {budget_s:.0f} s budget left"
        if reason is not None:
            ctx.results.update(check.id, status="SKIPPED", detail=reason)
        else:
            ctx.results.update(check.id, status="RUNNING", timeout_s=round(timeout))
            print(f"...     {check.id}: {check.title} (at most {timeout:.0f} s)", flush=True)
            try:
                if check.in_child:
                    run_in_child(ctx, check, timeout)
                elif check.id == "iois_epoch":
                    check_iois_epoch(ctx, check, timeout)
                elif check.id == "iois_resume":
                    skipped = check_iois_resume(ctx, check, timeout)
                    if skipped:
                        ctx.results.update(check.id, status="SKIPPED", detail=skipped)
                else:
                    check_iois_two_workers(ctx, check, timeout)
            except Exception as e:  # noqa: BLE001 - a check that breaks is a FAIL; the others still run
                ctx.results.update(check.id, status="FAIL", detail=f"{type(e).__name__}: {str(e)[:300]}")
            ctx.results.update(check.id, seconds=round(time.monotonic() - check_started, 1))
        print_entry(ctx.results.entry(check.id))
    data = ctx.results.read()
    data["seconds"] = round(time.monotonic() - started, 1)
    ctx.results._write(data)
    counts = {s: [c["check"] for c in data["checks"] if c["status"] == s] for s in ("PASS", "FAIL", "SKIPPED")}
    print(f"gpu_acceptance: {len(counts['PASS'])} PASS, {len(counts['FAIL'])} FAIL"
          + (f" ({', '.join(counts['FAIL'])})" if counts["FAIL"] else "")
          + f", {len(counts['SKIPPED'])} SKIPPED in {data['seconds']:.0f} s; {ctx.results.path}", flush=True)
    return 1 if counts["FAIL"] else 0


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--probed-train"]:  # the `ioisray train` process of an IOIS check (see probed_train)
        return probed_train(argv[1], argv[2:])
    started = time.monotonic()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-dry-run", action="store_true", help="the same checks at tiny sizes on the CPU")
    ap.add_argument("--out", type=Path, help="results.json and logs (default: a temporary folder)")
    ap.add_argument("--work", type=Path, help="runs and models (default: a temporary folder)")
    ap.add_argument("--budget-s", type=float, help="seconds the whole script may take (default 540, for a "
                    "10-minute call; 1200 in the dry run, where a busy CPU is slow but nothing is measured)")
    ap.add_argument("--checks", help=f"comma-separated checks to run (default all): {', '.join(BY_ID)}")
    ap.add_argument("--compile-backend", help="torch.compile backend (default: inductor; eager in the dry run)")
    ap.add_argument("--check", choices=sorted(IN_CHILD), help=argparse.SUPPRESS)  # one check, in a child process
    args = ap.parse_args(argv)
    only = None
    if args.checks:
        only = set(args.checks.split(",")) - {""}
        if only - set(BY_ID):
            ap.error(f"--checks: unknown {', '.join(sorted(only - set(BY_ID)))}; choose from {', '.join(BY_ID)}")
    if args.check is None:
        missing, broken = unimportable()
        if missing or broken:
            print(unimportable_line(missing, broken), file=sys.stderr)
            return 2
    import torch

    gpus = torch.cuda.device_count()
    if not args.cpu_dry_run and gpus == 0:
        print("gpu_acceptance: no CUDA GPU here (torch.cuda.device_count() is 0); --cpu-dry-run checks the script "
              "on a CPU", file=sys.stderr)
        return 2
    out = args.out or Path(tempfile.mkdtemp(prefix="gpu-acceptance-"))
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-acceptance-work-"))
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    import warnings

    warnings.filterwarnings("ignore", module=r"torch\._dynamo.*")  # tracing diffusers' UNet is chatty
    ctx = Context(dry_run=args.cpu_dry_run, out=out.resolve(), work=work.resolve(), gpus=gpus,
                  results=Results(out.resolve() / "results.json"),
                  compile_backend=args.compile_backend or ("eager" if args.cpu_dry_run else "inductor"))
    if args.check:
        return child_main(ctx, args.check)
    return run_all(ctx, args.budget_s or (1200.0 if args.cpu_dry_run else 540.0), only, started)


if __name__ == "__main__":
    sys.exit(main())
