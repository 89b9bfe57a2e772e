"""What one synthesis actor does, without Ray: hold the diffusion model, take the classifier's weights
for the epoch, turn (labels, seeds) into images. Benchmarks and tests use it directly.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import numpy as np
import torch

from ioisray.models.diffusion import load_noise_scheduler, load_unet
from ioisray.sampler import SamplerConfig, sample


class DiffusionGenerator:
    """A class-conditional diffusion model (loaded once) plus a guiding classifier (reloaded per epoch)."""

    def __init__(self, model_dir: str, num_classes: int, sampler: SamplerConfig,
                 make_classifier: Optional[Callable[[], torch.nn.Module]] = None,
                 device: str | torch.device = "cpu", num_threads: Optional[int] = None):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = torch.device(device)
        self.unet = load_unet(model_dir, num_classes).to(self.device).eval()
        self.noise_scheduler = load_noise_scheduler(model_dir)
        self.sampler = sampler
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
                       device=self.device)
        return {"image": batch.images.numpy(), "label": np.asarray(labels, dtype=np.int64),
                "seed": np.asarray(seeds, dtype=np.int64), "seconds": time.perf_counter() - start}
