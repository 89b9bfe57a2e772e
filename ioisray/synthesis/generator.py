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
from ioisray.iois import live_filter
from ioisray.models import build_classifier
from ioisray.models.diffusion import load_noise_scheduler, load_unet, num_data_classes
from ioisray.precision import configure_device, sampler_dtype
from ioisray.sampler import SamplerConfig, _to_device, default_classifier_transform, sample
from ioisray.synthesis.plan import chunk_sizes, epoch_budget
from ioisray.transforms import eval_transform


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
    `filter_threshold` > 0 drops every image the judge gives less than that probability of its class:
    the model `make_judge` builds (loaded once), or else the guide's architecture with each epoch's
    weights (none before the first: nothing is filtered then).
    """

    def __init__(self, model_dir: str, num_classes: int, sampler: SamplerConfig,
                 make_classifier: Optional[Callable[[], torch.nn.Module]] = None,
                 device: str | torch.device = "cpu", num_threads: Optional[int] = None,
                 gpu_share: float = 1.0, compile_backend: str | Callable = "inductor",
                 output_size: Optional[int] = None, warmup_sizes: Iterable[int] = (),
                 filter_threshold: float = 0.0, make_judge: Optional[Callable[[], torch.nn.Module]] = None):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.device, self.output_size, self.num_classes = torch.device(device), output_size, num_classes
        self.filter_threshold = float(filter_threshold)
        self.judge = (make_judge().to(self.device).eval().requires_grad_(False)
                      if make_judge is not None and self.filter_threshold > 0 else None)
        self.live_judge = False  # the guide judges (this epoch's weights arrived, and no judge of its own)
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
        """This epoch's classifier weights (a state dict of CPU tensors); None samples unguided (and, with
        the live classifier as the filter's judge, unfiltered)."""
        loaded = state is not None and self.guide is not None
        if loaded:
            self.guide.load_state_dict(state)
            self.guide.eval()
        self.guided = loaded and self.sampler.guidance_scale > 0
        self.live_judge = loaded and self.filter_threshold > 0 and self.judge is None

    def generate(self, labels: np.ndarray, seeds: np.ndarray) -> dict[str, np.ndarray]:
        """{"image": uint8 (n, H, W, 3), "label": int64 (n,), "seed": int64 (n,)} plus the seconds it took;
        when a judge filters them, the images kept and "filtered": the images dropped per class."""
        start = time.perf_counter()
        labels = np.asarray(labels, dtype=np.int64)
        batch = self._sample(labels, seeds, self.sampler, self.classifier if self.guided else None)
        out = {"image": batch.images.numpy(), "label": labels, "seed": np.asarray(seeds, dtype=np.int64)}
        judge = self.judge if self.judge is not None else (self.guide if self.live_judge else None)
        if judge is not None:
            keep = self._judged(judge, batch.images, labels)
            out = {k: v[keep] for k, v in out.items()}
            out["filtered"] = np.bincount(labels[~keep], minlength=self.num_classes).astype(np.int64)
        out["seconds"] = time.perf_counter() - start
        return out

    @torch.no_grad()
    def _judged(self, judge: torch.nn.Module, images: torch.Tensor, labels: np.ndarray) -> np.ndarray:
        """Which images `judge` gives at least the threshold probability of their label, seen as training
        sees an image at evaluation (uint8 images, ImageNet-normalised)."""
        logits = judge(eval_transform(_to_device(images, self.device)))
        rows = torch.arange(len(labels), device=logits.device)
        p = torch.softmax(logits.float(), dim=1)[rows, torch.as_tensor(labels).to(logits.device)]
        return (p >= self.filter_threshold).cpu().numpy()

    def _sample(self, labels, seeds: np.ndarray, cfg: SamplerConfig, classifier):
        return sample(self.unet, labels, np.asarray(seeds).tolist(), cfg, classifier=classifier,
                      classifier_transform=self.classifier_transform, scheduler=self.noise_scheduler,
                      device=self.device, output_size=self.output_size)


def _channels_last(transform: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    def channels_last(x: torch.Tensor) -> torch.Tensor:
        return transform(x).contiguous(memory_format=torch.channels_last)

    return channels_last


def load_judge(run: str, num_classes: int) -> torch.nn.Module:
    """The best model of a finished `ioisray train` run (synthesis.filter_model; a URI is fetched to this
    node), in eval mode."""
    from ioisray import storage
    from ioisray.models.trained import load_classifier_run

    model, _, names = load_classifier_run(storage.fetch_dir(run))
    if len(names) != num_classes:
        raise ValueError(f"synthesis.filter_model: {run} classifies {len(names)} classes, the data has {num_classes}")
    return model


def generator_factory(cfg: Config, model_dir: str, num_classes: int):
    """What each synthesis actor calls to build its DiffusionGenerator. The guiding classifier is built
    as an architecture only: its weights come with every epoch, and `model.weights` is a file on the
    driver's disk that a synthesis node does not have. So is the live classifier that judges for
    synthesis.filter; a synthesis.filter_model is loaded by each actor."""
    s, sy = cfg.sampler, cfg.synthesis
    guided = sy.mode == "online" and sy.guidance and s.guidance_scale > 0
    sampler = dataclasses.replace(s, guidance_scale=s.guidance_scale if guided else 0.0)
    needs_live = guided or live_filter(cfg)
    return functools.partial(
        DiffusionGenerator, model_dir, num_classes, sampler, output_size=cfg.data.image_size,
        warmup_sizes=tuple(sorted(set(chunk_sizes(epoch_budget(sy), sy.chunk_size, sy.pool_size)))),
        filter_threshold=sy.filter,
        make_judge=(functools.partial(load_judge, sy.filter_model, num_classes) if sy.filter and sy.filter_model
                    else None),
        make_classifier=(functools.partial(build_classifier, cfg, num_classes, pretrained=False) if needs_live
                         else None),
        device="cuda" if sy.num_gpus > 0 else "cpu", num_threads=max(1, int(sy.num_cpus)) if sy.num_gpus == 0 else None,
        gpu_share=min(sy.num_gpus, 1.0) if sy.num_gpus > 0 else 1.0)
