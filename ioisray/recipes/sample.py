"""Recipe: sample a grid of synthetic images from a trained diffusion model, optionally guided.

    setup    the data's class names and count (the model must match them), the diffusion model
             (`diffusion.model_dir`, a diffusers UNet2DModel folder), and the guiding classifier:
             the best-on-validation weights of a finished `ioisray train` run
    sample   `per_class` images of every class with seeds 0, 1, 2, ... (the same seeds for every
             setting, so grids compare image by image); `sampler.*` sets steps, scale and form, and
             `sampler.cfg_scale` classifier-free guidance (a model pretrained with label dropout)
    save     <output_dir>/<name>/samples/: images/<class>_seed<seed>.png (each image at data.image_size),
             grid.png (one row per class, labelled, enlarged to be seen), samples.json (class, seed
             and file of each image) and config.yaml; a training run's own files are never touched
"""
from __future__ import annotations

import dataclasses
import io
import json
import re
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ioisray.atomic import atomic_write_bytes, atomic_write_text
from ioisray.config import Config, ConfigError, save_config
from ioisray.data.setup import setup_data
from ioisray.models.diffusion import load_noise_scheduler, load_unet, null_class
from ioisray.models.trained import load_classifier_for
from ioisray.recipes.prerequisites import check_cfg_scale
from ioisray.run import run_dir
from ioisray.sampler import sample


def sample_grid(cfg: Config, per_class: int = 8, guide_run: Optional[str] = None) -> Path:
    from tqdm import tqdm

    if not cfg.diffusion.model_dir:
        raise ConfigError("diffusion.model_dir: set it to a trained diffusion model folder "
                          "(e.g. outputs/<pretraining run>/unet)")
    ds, _ = setup_data(cfg)
    unet = load_unet(cfg.diffusion.model_dir, ds.num_classes)  # class count must match the data
    check_cfg_scale(cfg, cfg.diffusion.model_dir, null_class(unet))
    noise_scheduler = load_noise_scheduler(cfg.diffusion.model_dir)
    guide = None
    if guide_run and cfg.sampler.guidance_scale > 0:
        guide, _, _ = load_classifier_for(guide_run, ds.class_names, cfg.data.image_size, "--guide-run")
    device = torch.device("cuda" if cfg.ray.use_gpu and torch.cuda.is_available() else "cpu")
    s = cfg.sampler
    scfg = dataclasses.replace(s, guidance_scale=s.guidance_scale if guide else 0.0)
    labels = [c for c in range(ds.num_classes) for _ in range(per_class)]
    seeds = list(range(len(labels)))
    unet, guide = unet.to(device), guide.to(device) if guide else None
    images = []
    # One class at a time, so that the bar moves (each image's seed fixes it, whatever the batch).
    with tqdm(total=len(labels), unit="image", desc="sampling", file=sys.stderr, mininterval=1.0) as bar:
        for start in range(0, len(labels), per_class):
            batch = sample(unet, labels[start:start + per_class], seeds[start:start + per_class], scfg,
                           classifier=guide, scheduler=noise_scheduler, device=device,
                           output_size=cfg.data.image_size)
            images.append(batch.images)
            bar.update(len(batch.images))
    images = torch.cat(images).numpy()
    out = run_dir(cfg) / "samples"
    save_config(cfg, out / "config.yaml")
    files = [f"images/{_file_safe(ds.class_names[c])}_seed{seed}.png" for c, seed in zip(labels, seeds)]
    for image, name in zip(images, files):
        atomic_write_bytes(out / name, _png(image))
    atomic_write_bytes(out / "grid.png", _png(labelled_grid(images, ds.class_names, per_class)))
    atomic_write_text(out / "samples.json", json.dumps({
        "class_names": ds.class_names, "labels": labels, "seeds": seeds, "files": files, "guide_run": guide_run,
        "sampler": dataclasses.asdict(scfg), "output_size": cfg.data.image_size,
        "model_dir": cfg.diffusion.model_dir}, indent=1))
    return out / "grid.png"


def _file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "class"


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


GRID_TILE = 64  # smaller images are enlarged (nearest neighbour) to this side in the grid
PAD = 2


def labelled_grid(images: np.ndarray, class_names: list[str], per_class: int) -> np.ndarray:
    """(N, H, W, 3) uint8 images, `per_class` consecutive ones a class, as one image: a row per class
    with the class name at its left, tiles of at least GRID_TILE pixels."""
    from PIL import Image, ImageDraw, ImageFont

    size = images.shape[1]
    scale = max(1, -(-GRID_TILE // size))
    tile = size * scale
    font = ImageFont.load_default()
    label_w = max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(n, font=font)) for n in class_names) + 8
    rows = len(images) // per_class
    grid = Image.new("RGB", (label_w + per_class * (tile + PAD) + PAD, rows * (tile + PAD) + PAD), "white")
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images):
        row, col = divmod(i, per_class)
        y = PAD + row * (tile + PAD)
        grid.paste(Image.fromarray(image).resize((tile, tile), Image.NEAREST), (label_w + PAD + col * (tile + PAD), y))
        if col == 0:
            draw.text((4, y + tile // 2), class_names[row], fill="black", font=font, anchor="lm")
    return np.asarray(grid)
