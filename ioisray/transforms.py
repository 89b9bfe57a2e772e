"""Batch image transforms for training and evaluation (plain PyTorch, no Ray, no config).

Images arrive as uint8 (B, H, W, 3) RGB, already resized to the configured size when loaded, on the
device that trains (CPU or GPU). Training augments every image with its own random parameters, as
torchvision's RandomResizedCrop, RandomHorizontalFlip / RandomVerticalFlip and ColorJitter do one image
at a time, but in one batched call on the batch's device: crop and flips are one affine resampling
(`grid_sample`), colour jitter a few element-wise blends. No per-image Python loop and no host
sync. Evaluation only normalises, so test-time results are deterministic. Synthetic images go
through the same training transform as real ones.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

# ImageNet statistics: right for ImageNet-pretrained timm weights, harmless from scratch.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
_GREY = (0.2989, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale
_CROP_TRIES = 10  # as torchvision's RandomResizedCrop.get_params
_RATIO = (3 / 4, 4 / 3)


@functools.lru_cache(maxsize=64)
def on_device(values: tuple[float, ...], device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`values` as a 1-D tensor on `device`, made once per (values, device, dtype) and shared: building it
    per batch would copy it from the host, and a copy from pageable memory waits for the GPU. Callers
    must not modify it in place. Made outside inference mode, so that autograd may save it (the
    sampler's guidance divides by the std)."""
    with torch.inference_mode(False):
        return torch.tensor(values, device=device, dtype=dtype)


def normalise(x: torch.Tensor) -> torch.Tensor:
    """float (B, 3, H, W) in [0, 1] -> ImageNet-normalised."""
    mean = on_device(MEAN, x.device, x.dtype).view(1, 3, 1, 1)
    std = on_device(STD, x.device, x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def to_float_chw(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> normalised float (B, 3, H, W)."""
    return normalise(images.permute(0, 3, 1, 2).float().div_(255.0))


def crop_boxes(batch: int, height: int, width: int, scale: tuple[float, float],
               device: torch.device) -> torch.Tensor:
    """(B, 4) integer boxes (top, left, h, w), one per image, drawn as RandomResizedCrop draws them:
    area fraction uniform in `scale`, log aspect ratio uniform in [log 3/4, log 4/3], the first of 10
    tries that fits, else the largest centred crop of a clamped ratio."""
    area = height * width
    u = torch.rand(batch, _CROP_TRIES, 2, device=device)
    target = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_lo, log_hi = math.log(_RATIO[0]), math.log(_RATIO[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.float().argmax(dim=1, keepdim=True)  # index of the first try that fits
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    # Fallback (no try fits, rare for the usual scales): the whole image at a clamped aspect ratio.
    in_ratio = width / height
    fw, fh = float(width), float(height)
    if in_ratio < _RATIO[0]:
        fh = float(round(width / _RATIO[0]))
    elif in_ratio > _RATIO[1]:
        fw = float(round(height * _RATIO[1]))
    ok = fits.any(dim=1)
    w, h = torch.where(ok, w, torch.full_like(w, fw)), torch.where(ok, h, torch.full_like(h, fh))
    r = torch.rand(batch, 2, device=device)
    top = torch.where(ok, torch.floor(r[:, 0] * (height - h + 1)), torch.full_like(h, (height - fh) // 2))
    left = torch.where(ok, torch.floor(r[:, 1] * (width - w + 1)), torch.full_like(w, (width - fw) // 2))
    return torch.stack([top, left, h, w], dim=1)


def resized_crop_and_flip(x: torch.Tensor, boxes: torch.Tensor, hflip: torch.Tensor, vflip: torch.Tensor,
                          size: int) -> torch.Tensor:
    """Crop `boxes` (top, left, h, w) out of float (B, C, H, W) images, resize each crop to `size`
    (bilinear) and mirror the images flagged in `hflip` / `vflip`, all in one `grid_sample`.

    The affine map takes output pixel centres to the crop's pixel centres (align_corners=False), as
    a bilinear resize of the cropped tensor does; only samples within half a pixel of the crop's
    border differ, blending in the pixel just outside the crop instead of repeating the edge."""
    b, c, height, width = x.shape
    top, left, h, w = boxes.to(x.dtype).unbind(1)
    sx, sy = w / width, h / height
    tx, ty = (2 * left + w) / width - 1, (2 * top + h) / height - 1
    sx = torch.where(hflip, -sx, sx)
    sy = torch.where(vflip, -sy, sy)
    zero = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx, zero, tx], 1), torch.stack([zero, sy, ty], 1)], 1)
    grid = F.affine_grid(theta, [b, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _grey(x: torch.Tensor) -> torch.Tensor:
    w = on_device(_GREY, x.device, x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def color_jitter(x: torch.Tensor, strength: float) -> torch.Tensor:
    """Brightness, contrast and saturation factors uniform in [max(0, 1 - s), 1 + s], one of each per
    image, applied in a random order per image, as torchvision's ColorJitter(s, s, s) does."""
    b = x.shape[0]
    lo, hi = max(0.0, 1.0 - strength), 1.0 + strength
    factors = (lo + (hi - lo) * torch.rand(b, 3, device=x.device, dtype=x.dtype)).view(b, 3, 1, 1, 1)
    order = torch.rand(b, 3, device=x.device).argsort(dim=1)  # each image's order of the three ops
    for step in range(3):
        op = order[:, step].view(b, 1, 1, 1)
        f = factors[torch.arange(b, device=x.device), order[:, step]]
        bright = x * f
        contrast = x * f + _grey(x).mean(dim=(2, 3), keepdim=True) * (1 - f)
        saturate = x * f + _grey(x) * (1 - f)
        x = torch.where(op == 0, bright, torch.where(op == 1, contrast, saturate)).clamp_(0.0, 1.0)
    return x


class TrainTransform:
    """Random resized crop (`crop_scale`, (1, 1) disables), horizontal / vertical flips and colour
    jitter, each image with its own parameters, then normalisation. `augment` is any object with
    crop_scale, hflip, vflip and color_jitter (the config's `train.augment`)."""

    def __init__(self, image_size: int, augment):
        self.size = image_size
        self.crop_scale = tuple(float(v) for v in augment.crop_scale)
        self.hflip, self.vflip, self.jitter = bool(augment.hflip), bool(augment.vflip), float(augment.color_jitter)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> augmented, normalised float (B, 3, size, size), on images' device."""
        x = images.permute(0, 3, 1, 2).float().div_(255.0)
        b, _, height, width = x.shape
        crop = self.crop_scale != (1.0, 1.0)
        if crop or self.hflip or self.vflip or (height, width) != (self.size, self.size):
            boxes = (crop_boxes(b, height, width, self.crop_scale, x.device) if crop else
                     on_device((0.0, 0.0, float(height), float(width)), x.device).expand(b, 4))
            coin = torch.rand(b, 2, device=x.device) < 0.5
            no = torch.zeros(b, dtype=torch.bool, device=x.device)
            x = resized_crop_and_flip(x, boxes, coin[:, 0] if self.hflip else no, coin[:, 1] if self.vflip else no,
                                      self.size)
        if self.jitter > 0:
            x = color_jitter(x, self.jitter)
        return normalise(x)


def eval_transform(images: torch.Tensor) -> torch.Tensor:
    return to_float_chw(images)
