"""Class-conditional diffusers UNet2DModel presets for IOIS image synthesis.

Class conditioning uses UNet2DModel's `num_class_embeds` (a label embedding added to the time
embedding, as in ADM). Each preset holds the UNet2DModel kwargs plus its default image size.
A saved model is a diffusers UNet folder that also holds the noise scheduler it was trained with
(`scheduler_config.json`: beta schedule and prediction type), so sampling always matches training.

A model pretrained with label dropout (`diffusion.label_dropout`, for classifier-free guidance) has one
more label embedding than the data has classes: the null class, whose index is the class count. Its
folder says so in `class_conditioning.json`, so a folder alone tells whether it supports CFG.
"""
from __future__ import annotations

import json
import os

import torch.nn as nn
from diffusers import DDPMScheduler, UNet2DModel

from ioisray import storage
from ioisray.sampler import PREDICTION_TYPES, make_train_scheduler

_D, _AD, _U, _AU = "DownBlock2D", "AttnDownBlock2D", "UpBlock2D", "AttnUpBlock2D"

PRESETS: dict[str, dict] = {
    # CPU demos and tests: ~1.1M parameters, one attention block at the lowest resolution.
    "tiny": dict(
        sample_size=32,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=(_D, _D, _AD),
        up_block_types=(_AU, _U, _U),
        attention_head_dim=32,
        norm_num_groups=16,
    ),
    # 32x32, ~4.4M parameters: tiny at twice the width. On HAM10000 (CPU) it took 2.7x tiny's pretraining
    # time an epoch and 1.7x its IOIS generation time, and its samples judged no better
    # (benchmarks/log/2026-12-04.md).
    "small32": dict(
        sample_size=32,
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        down_block_types=(_D, _D, _AD),
        up_block_types=(_AU, _U, _U),
        attention_head_dim=32,
        norm_num_groups=32,
    ),
    # 64x64, ~27.7M parameters: attention at 16x16 and 8x8, ADM-style scale-shift norm.
    "small64": dict(
        sample_size=64,
        block_out_channels=(64, 128, 256, 256),
        layers_per_block=2,
        down_block_types=(_D, _D, _AD, _AD),
        up_block_types=(_AU, _AU, _U, _U),
        attention_head_dim=64,
        resnet_time_scale_shift="scale_shift",
    ),
    # The guided-diffusion 128x128 model the paper uses: channel_mult (1, 1, 2, 3, 4) x 256,
    # 2 res blocks per level, attention at 32/16/8 with 64-channel heads, scale-shift norm.
    # 385.0M parameters (conv down/upsampling rather than ADM's resblock_updown, which would add 32M).
    "adm128": dict(
        sample_size=128,
        block_out_channels=(256, 256, 512, 768, 1024),
        layers_per_block=2,
        down_block_types=(_D, _D, _AD, _AD, _AD),
        up_block_types=(_AU, _AU, _AU, _U, _U),
        attention_head_dim=64,
        resnet_time_scale_shift="scale_shift",
    ),
}


CLASS_CONDITIONING_FILE = "class_conditioning.json"


def null_class(unet) -> int | None:
    """The label of the UNet's null class (classifier-free guidance), or None when it has none."""
    return getattr(unet, "null_class_label", None)


def num_data_classes(unet) -> int:
    """How many real classes the UNet is conditioned on (its label embeddings less the null class)."""
    return int(unet.config.num_class_embeds) - (null_class(unet) is not None)


def create_unet(preset: str, num_classes: int, image_size: int | None = None,
                null_class_label: bool = False) -> UNet2DModel:
    """A freshly initialised class-conditional UNet; `image_size` overrides the preset's size;
    `null_class_label` adds the null class (label `num_classes`) that label dropout trains."""
    if preset not in PRESETS:
        raise ValueError(f"diffusion.preset {preset!r} is unknown; choose one of {sorted(PRESETS)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    kwargs = dict(PRESETS[preset])
    if image_size is not None:
        # Every level but the last halves the size, so it must divide evenly.
        factor = 2 ** (len(kwargs["block_out_channels"]) - 1)
        if image_size < factor or image_size % factor:
            raise ValueError(
                f"image_size {image_size} must be a positive multiple of {factor} for preset {preset!r}")
        kwargs["sample_size"] = image_size
    unet = UNet2DModel(**kwargs, num_class_embeds=num_classes + int(null_class_label))
    unet.null_class_label = num_classes if null_class_label else None
    return unet


def load_unet(path: str, num_classes: int) -> UNet2DModel:
    """Load a UNet saved with `save_pretrained(path)` (a folder or a filesystem URI) and check it was
    trained for `num_classes` classes."""
    path = storage.fetch_dir(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"diffusion.model_dir: directory {path!r} does not exist")
    try:
        # low_cpu_mem_usage=False: the default wants `accelerate`, which we do not depend on.
        unet = UNet2DModel.from_pretrained(path, use_safetensors=True, low_cpu_mem_usage=False)
    except (OSError, ValueError) as e:  # no config.json / no safetensors weights / wrong model type
        raise ValueError(f"diffusion.model_dir: {path!r} is not a diffusers UNet2DModel folder "
                         f"(config.json + diffusion_pytorch_model.safetensors): {e}") from None
    if unet.config.num_class_embeds is None:
        raise ValueError(f"UNet at {path!r} is not class-conditional (config.num_class_embeds is None)")
    unet.null_class_label = _saved_null_class(path)
    found = num_data_classes(unet)
    if found != num_classes:
        raise ValueError(f"diffusion.model_dir: the UNet at {path!r} was built for {found} classes but the "
                         f"dataset has {num_classes}")
    return unet


def saved_null_class(path: str) -> int | None:
    """The null class a saved model folder (local or a URI) records, without loading its weights."""
    return _saved_null_class(storage.fetch_dir(path))


def _saved_null_class(path: str) -> int | None:
    file = os.path.join(path, CLASS_CONDITIONING_FILE)
    if not os.path.isfile(file):
        return None  # a model without label dropout (every model saved before it existed)
    try:
        value = json.loads(open(file).read())["null_class"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"diffusion.model_dir: {file!r} is not a valid {CLASS_CONDITIONING_FILE}: {e}") from None
    if value is not None and not isinstance(value, int):
        raise ValueError(f"diffusion.model_dir: {file!r}: null_class must be an integer or null, got {value!r}")
    return value


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_diffusion_model(unet: UNet2DModel, noise_scheduler: DDPMScheduler, path: str | os.PathLike) -> None:
    """The UNet (safetensors) and the noise scheduler it was trained with, in one diffusers folder."""
    unet.save_pretrained(path, safe_serialization=True)
    noise_scheduler.save_pretrained(path)
    if null_class(unet) is not None:
        with open(os.path.join(path, CLASS_CONDITIONING_FILE), "w") as f:
            json.dump({"null_class": null_class(unet)}, f)


def load_noise_scheduler(path: str | os.PathLike) -> DDPMScheduler:
    """The training noise scheduler saved next to a UNet; linear betas and epsilon prediction for a
    folder without one (a plain diffusers UNet, or a model saved before schedules were recorded)."""
    path = storage.fetch_dir(str(path))
    if not os.path.isfile(os.path.join(path, DDPMScheduler.config_name)):
        return make_train_scheduler()
    try:
        scheduler = DDPMScheduler.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"diffusion.model_dir: {path!r} has an unreadable {DDPMScheduler.config_name}: {e}") from None
    if scheduler.config.prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"diffusion.model_dir: {path!r} predicts {scheduler.config.prediction_type!r}; "
                         f"the sampler supports {PREDICTION_TYPES}")
    return scheduler
