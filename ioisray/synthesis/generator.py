"""What one synthesis actor does, without Ray: hold the diffusion model, take the classifier's weights
for the epoch, turn (labels, seeds) into images. Benchmarks and tests use it directly.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Iterable, Optional

import numpy as np
import torch

from ioisray.config import Config
from ioisray.models import build_classifier
from ioisray.models.diffusion import load_noise_scheduler, load_unet, num_data_classes
from ioisray.precision import configure_device, sampler_dtype
from ioisray.sampler import SamplerConfig, default_classifier_transform, sample
from ioisray.synthesis.plan import chunk_sizes


class DiffusionGenerator:
    """A class-conditional diffusion model (loaded once) plus a guiding classifier (reloaded per epoch).

    `make_classifier` builds the guide's architecture only: its weights arrive with each epoch
    (`set_classifier`), so no weights file of the driver's disk is needed on a synthesis node.
    `sampler.dtype` / `sampler.compile` left at None are resolved for `device` here: bf16 where it is
    native; the UNet compiled once (CUDA), with a dynamic batch dimension, so the chunk sizes of a run
    share a graph or two (diffusers takes another from 64 images on), made by the warm-up. The guide is
    compiled when the UNet is, and channels-last on CUDA; only its input gets a gradient. `gpu_share`
    caps this process's memory on a shared GPU.
    `output_size`: the size of the images made (the classifier's input size; None: the UNet's).
    `warmup_sizes`: the chunk sizes of the run (plan.chunk_sizes), each sampled once here (see warm_up).
    """

    def __init__(self, model_dir: str, num_classes: int, sampler: SamplerConfig,
                 make_classifier: Optional[Callable[[], torch.nn.Module]] = None,
                 device: str | torch.device = "cpu", num_threads: Optional[int] = None,
                 gpu_share: float = 1.0, compile_backend: str | Callable = "inductor",
                 output_size: Optional[int] = None, warmup_sizes: Iterable[int] = ()):
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
        # The guide's weights are loaded into `guide`; the sampler calls `classifier` (the same module,
        # compiled or not).
        self.guide = self.classifier = None
        self.classifier_transform = default_classifier_transform(output_size)
        if make_classifier:
            self.guide = make_classifier().to(self.device).eval().requires_grad_(False)
            if self.device.type == "cuda":  # NHWC convolutions run on the tensor cores without transposes
                self.guide = self.guide.to(memory_format=torch.channels_last)
                self.classifier_transform = _channels_last(self.classifier_transform)
            self.classifier = torch.compile(self.guide, backend=compile_backend) if compile_ else self.guide
        self.guided = False
        self.warmed_up = self.warm_up(warmup_sizes)

    def warm_up(self, sizes: Iterable[int]) -> list[int]:
        """One sampler step on a chunk of each of `sizes`, guided when there is a guide (its weights do not
        matter here), so that the actor pays before it reports ready what the first chunks of the first
        epochs would otherwise pay while the trainer waits for them: compiling the UNet and the guide,
        diffusers' second graph for batches of 64 and more (its Upsample2D and ResnetBlock2D branch on the
        batch size), and cuDNN's autotuning of every batch shape. Nothing to warm on a CPU without
        compilation. Returns the sizes sampled."""
        if not (self.sampler.compile or self.device.type == "cuda"):
            return []
        sizes = sorted({int(n) for n in sizes if n > 0})
        one_step = dataclasses.replace(self.sampler, steps=1)
        num_classes = num_data_classes(self.unet)  # a null class (label dropout) is not sampled
        for n in sizes:
            self._sample(np.arange(n) % num_classes, np.arange(n), one_step, self.classifier)
        return sizes

    def set_classifier(self, state: Optional[dict]) -> None:
        """This epoch's classifier weights (a state dict of CPU tensors); None samples unguided."""
        self.guided = state is not None and self.guide is not None and self.sampler.guidance_scale > 0
        if self.guided:
            self.guide.load_state_dict(state)
            self.guide.eval()

    def generate(self, labels: np.ndarray, seeds: np.ndarray) -> dict[str, np.ndarray]:
        """{"image": uint8 (n, H, W, 3), "label": int64 (n,), "seed": int64 (n,)} plus the seconds it took."""
        start = time.perf_counter()
        batch = self._sample(labels, seeds, self.sampler, self.classifier if self.guided else None)
        return {"image": batch.images.numpy(), "label": np.asarray(labels, dtype=np.int64),
                "seed": np.asarray(seeds, dtype=np.int64), "seconds": time.perf_counter() - start}

    def _sample(self, labels, seeds: np.ndarray, cfg: SamplerConfig, classifier):
        return sample(self.unet, labels, np.asarray(seeds).tolist(), cfg, classifier=classifier,
                      classifier_transform=self.classifier_transform, scheduler=self.noise_scheduler,
                      device=self.device, output_size=self.output_size)


def _channels_last(transform: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    def channels_last(x: torch.Tensor) -> torch.Tensor:
        return transform(x).contiguous(memory_format=torch.channels_last)

    return channels_last


def generator_factory(cfg: Config, model_dir: str, num_classes: int):
    """What each synthesis actor calls to build its DiffusionGenerator. The guiding classifier is built
    as an architecture only: its weights come with every epoch, and `model.weights` is a file on the
    driver's disk that a synthesis node does not have."""
    s, sy = cfg.sampler, cfg.synthesis
    guided = sy.mode == "online" and sy.guidance and s.guidance_scale > 0
    sampler = dataclasses.replace(s, guidance_scale=s.guidance_scale if guided else 0.0)
    return functools.partial(
        DiffusionGenerator, model_dir, num_classes, sampler, output_size=cfg.data.image_size,
        warmup_sizes=tuple(sorted(set(chunk_sizes(sy.budget, sy.chunk_size, sy.pool_size)))),
        make_classifier=functools.partial(build_classifier, cfg, num_classes, pretrained=False) if guided else None,
        device="cuda" if sy.num_gpus > 0 else "cpu", num_threads=max(1, int(sy.num_cpus)) if sy.num_gpus == 0 else None,
        gpu_share=min(sy.num_gpus, 1.0) if sy.num_gpus > 0 else 1.0)
