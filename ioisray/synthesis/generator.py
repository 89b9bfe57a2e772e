"""What one synthesis actor does, without Ray: hold the diffusion model, take the classifier's weights
for the epoch, turn (labels, seeds) into images. Benchmarks and tests use it directly.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Optional

import numpy as np
import torch

from ioisray.config import Config
from ioisray.models import build_classifier
from ioisray.models.diffusion import load_noise_scheduler, load_unet
from ioisray.precision import configure_device, sampler_dtype
from ioisray.sampler import SamplerConfig, sample


class DiffusionGenerator:
    """A class-conditional diffusion model (loaded once) plus a guiding classifier (reloaded per epoch).

    `make_classifier` builds the guide's architecture only: its weights arrive with each epoch
    (`set_classifier`), so no weights file of the driver's disk is needed on a synthesis node.
    `sampler.dtype` / `sampler.compile` left at None are resolved for `device` here: bf16 where it is
    native; the UNet compiled once (CUDA), with a dynamic batch dimension, so chunks of every size of
    a run share one compiled graph. `gpu_share` caps this process's memory on a shared GPU.
    `output_size`: the size of the images made (the classifier's input size; None: the UNet's).
    """

    def __init__(self, model_dir: str, num_classes: int, sampler: SamplerConfig,
                 make_classifier: Optional[Callable[[], torch.nn.Module]] = None,
                 device: str | torch.device = "cpu", num_threads: Optional[int] = None,
                 gpu_share: float = 1.0, compile_backend: str | Callable = "inductor",
                 output_size: Optional[int] = None):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.device, self.output_size = torch.device(device), output_size
        configure_device(self.device, gpu_share)
        compile_ = self.device.type == "cuda" if sampler.compile is None else sampler.compile
        self.sampler = dataclasses.replace(sampler, dtype=sampler_dtype(sampler.dtype, self.device), compile=compile_)
        self.unet = load_unet(model_dir, num_classes).to(self.device).eval()
        if compile_:
            self.unet = torch.compile(self.unet, backend=compile_backend)
        self.noise_scheduler = load_noise_scheduler(model_dir)
        self.classifier = make_classifier().to(self.device).eval() if make_classifier else None
        self.guided = False

    def set_classifier(self, state: Optional[dict]) -> None:
        """This epoch's classifier weights (a state dict of CPU tensors); None samples unguided."""
        self.guided = state is not None and self.classifier is not None and self.sampler.guidance_scale > 0
        if self.guided:
            self.classifier.load_state_dict(state)
            self.classifier.eval()

    def generate(self, labels: np.ndarray, seeds: np.ndarray) -> dict[str, np.ndarray]:
        """{"image": uint8 (n, H, W, 3), "label": int64 (n,), "seed": int64 (n,)} plus the seconds it took."""
        start = time.perf_counter()
        batch = sample(self.unet, labels, seeds.tolist(), self.sampler,
                       classifier=self.classifier if self.guided else None, scheduler=self.noise_scheduler,
                       device=self.device, output_size=self.output_size)
        return {"image": batch.images.numpy(), "label": np.asarray(labels, dtype=np.int64),
                "seed": np.asarray(seeds, dtype=np.int64), "seconds": time.perf_counter() - start}


def generator_factory(cfg: Config, model_dir: str, num_classes: int):
    """What each synthesis actor calls to build its DiffusionGenerator. The guiding classifier is built
    as an architecture only: its weights come with every epoch, and `model.weights` is a file on the
    driver's disk that a synthesis node does not have."""
    s, sy = cfg.sampler, cfg.synthesis
    guided = sy.mode == "online" and sy.guidance and s.guidance_scale > 0
    sampler = dataclasses.replace(s, guidance_scale=s.guidance_scale if guided else 0.0)
    return functools.partial(
        DiffusionGenerator, model_dir, num_classes, sampler, output_size=cfg.data.image_size,
        make_classifier=functools.partial(build_classifier, cfg, num_classes, pretrained=False) if guided else None,
        device="cuda" if sy.num_gpus > 0 else "cpu", num_threads=max(1, int(sy.num_cpus)) if sy.num_gpus == 0 else None,
        gpu_share=min(sy.num_gpus, 1.0) if sy.num_gpus > 0 else 1.0)
