"""Batch image transforms for training and evaluation (plain torch/torchvision, no Ray).

Images arrive as uint8 (B, H, W, 3) RGB, already resized to the configured size when loaded. Training
applies random augmentation per image (torchvision v2 draws one set of parameters per call, so it is
called once per image); evaluation only normalises, so test-time results are deterministic.
Synthetic images go through the same training transform as real ones.
"""
from __future__ import annotations

import torch
from torchvision.transforms import v2

from ioisray.config import AugmentConfig

# ImageNet statistics: right for ImageNet-pretrained timm weights, harmless from scratch.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def to_float_chw(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> normalised float (B, 3, H, W)."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class TrainTransform:
    def __init__(self, image_size: int, cfg: AugmentConfig):
        ops: list = []
        lo, hi = cfg.crop_scale
        if (lo, hi) != (1.0, 1.0):
            ops.append(v2.RandomResizedCrop(image_size, scale=(lo, hi), antialias=True))
        if cfg.hflip:
            ops.append(v2.RandomHorizontalFlip())
        if cfg.vflip:
            ops.append(v2.RandomVerticalFlip())
        if cfg.color_jitter > 0:
            j = cfg.color_jitter
            ops.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j))
        self.per_image = v2.Compose(ops) if ops else None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> augmented, normalised float (B, 3, H, W)."""
        if self.per_image is not None:
            chw = images.permute(0, 3, 1, 2)
            images = torch.stack([self.per_image(img) for img in chw]).permute(0, 2, 3, 1)
        return to_float_chw(images)


def eval_transform(images: torch.Tensor) -> torch.Tensor:
    return to_float_chw(images)
