"""Recipe: sample a grid of synthetic images from a trained diffusion model, optionally guided.

    setup    the data's class names and count (the model must match them), the diffusion model
             (`diffusion.model_dir`, a diffusers UNet2DModel folder), and the guiding classifier:
             the best-on-validation weights of a finished `ioisray train` run
    sample   `per_class` images of every class with seeds 0, 1, 2, ... (the same seeds for every
             setting, so grids compare image by image); `sampler.*` sets steps, scale and form
    save     <output_dir>/<name>/samples/: grid.png (one row per class), samples.json (label and seed of
             each image) and config.yaml; a training run's own files next to it are never touched
"""
from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path
from typing import Optional

import torch

from ioisray.atomic import atomic_write_bytes, atomic_write_text
from ioisray.config import Config, ConfigError, load_config, save_config
from ioisray.data.setup import setup_data
from ioisray.models import build_classifier, load_state_dict_file
from ioisray.models.diffusion import load_noise_scheduler, load_unet
from ioisray.recipes.train import BEST_MODEL_FILE
from ioisray.run import run_dir
from ioisray.sampler import sample


def load_classifier_run(run: str | Path):
    """(model in eval mode, its config, class names) of a finished `ioisray train` run's best epoch."""
    run = Path(run)
    needed = [run / "config.yaml", run / "metrics.json", run / BEST_MODEL_FILE]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{run} is not a finished `ioisray train` run: missing {missing}")
    cfg = load_config(run / "config.yaml")
    class_names = json.loads((run / "metrics.json").read_text()).get("class_names")
    if not class_names:
        raise ValueError(f"{run / 'metrics.json'} has no class_names: not a finished `ioisray train` run")
    # The best weights replace every tensor, so the file training started from (model.weights) is not
    # read: it may not exist where the run is used.
    model = build_classifier(cfg, len(class_names), pretrained=False)
    try:
        model.load_state_dict(load_state_dict_file(run / BEST_MODEL_FILE))
    except RuntimeError as e:  # torch's missing / unexpected keys or shapes
        raise ValueError(f"{run / BEST_MODEL_FILE} does not fit the model of {run / 'config.yaml'} "
                         f"({cfg.model.name}, {len(class_names)} classes): {str(e).splitlines()[0]}") from None
    return model.eval(), cfg, class_names


def sample_grid(cfg: Config, per_class: int = 8, guide_run: Optional[str] = None) -> Path:
    from PIL import Image
    from torchvision.utils import make_grid

    if not cfg.diffusion.model_dir:
        raise ConfigError("diffusion.model_dir: set it to a trained diffusion model folder "
                          "(e.g. outputs/<pretraining run>/unet)")
    ds, _ = setup_data(cfg)
    unet = load_unet(cfg.diffusion.model_dir, ds.num_classes)  # class count must match the data
    noise_scheduler = load_noise_scheduler(cfg.diffusion.model_dir)
    guide = None
    if guide_run and cfg.sampler.guidance_scale > 0:
        guide, guide_cfg, guide_names = load_classifier_run(guide_run)
        if guide_names != ds.class_names:
            raise ValueError(f"--guide-run {guide_run}: its classes {guide_names} differ from the data's "
                             f"{ds.class_names}")
        if guide_cfg.data.image_size != cfg.data.image_size:
            raise ValueError(f"--guide-run {guide_run} was trained at {guide_cfg.data.image_size}px but "
                             f"data.image_size is {cfg.data.image_size}: set data.image_size to match")
    device = torch.device("cuda" if cfg.ray.use_gpu and torch.cuda.is_available() else "cpu")
    s = cfg.sampler
    scfg = dataclasses.replace(s, guidance_scale=s.guidance_scale if guide else 0.0)
    labels = [c for c in range(ds.num_classes) for _ in range(per_class)]
    seeds = list(range(len(labels)))
    batch = sample(unet.to(device), labels, seeds, scfg, classifier=guide.to(device) if guide else None,
                   scheduler=noise_scheduler, device=device, output_size=cfg.data.image_size)
    out = run_dir(cfg) / "samples"
    save_config(cfg, out / "config.yaml")
    grid = make_grid(batch.images.permute(0, 3, 1, 2), nrow=per_class, padding=2).permute(1, 2, 0).numpy()
    png = io.BytesIO()
    Image.fromarray(grid).save(png, format="PNG")
    atomic_write_bytes(out / "grid.png", png.getvalue())
    atomic_write_text(out / "samples.json", json.dumps({
        "class_names": ds.class_names, "labels": labels, "seeds": seeds, "guide_run": guide_run,
        "sampler": dataclasses.asdict(scfg), "output_size": cfg.data.image_size, "model_dir": cfg.diffusion.model_dir}, indent=1))
    return out / "grid.png"
