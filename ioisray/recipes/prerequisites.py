"""What a training run needs before its first epoch, made here if it is missing: the diffusion model
IOIS samples from (with its provenance checked: it must never have seen the run's validation or test
images) and the baseline run the per-class change figure compares with."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ioisray import storage
from ioisray.config import Config, ConfigError, TrainConfig, load_config
from ioisray.data import provenance
from ioisray.data.setup import setup_data
from ioisray.recipes.console import say
from ioisray.run import Run, run_dir, run_location


def baseline_run(cfg: Config, train: Optional[Callable[[Config], dict]] = None) -> Optional[Path]:
    """The finished run `cfg.baseline` names. An experiment config is trained first with `train` (same
    output_dir, seed, data and Ray settings but its own ray.num_workers) unless its run has finished
    already; without `train`, None is returned for a baseline that has not finished."""
    if storage.is_uri(cfg.baseline):
        cfg = cfg.model_copy(update={"baseline": storage.fetch_dir(cfg.baseline)})
    path = Path(cfg.baseline).expanduser()
    if path.suffix not in (".yaml", ".yml"):
        if not (path / "metrics.json").is_file():
            raise ConfigError(f"baseline: {path} is not a finished run folder (no metrics.json)")
        return path
    if not path.is_file():
        raise ConfigError(f"baseline: config file not found: {path}")
    base = load_config(path, [f"output_dir={cfg.output_dir}", f"seed={cfg.seed}"])
    # Where the run runs (cluster, GPUs, resources), with the baseline's own number of workers.
    ray_settings = cfg.ray.model_copy(update={"num_workers": base.ray.num_workers})
    base = base.model_copy(update={"ray": ray_settings, "data": cfg.data})
    if base.baseline or base.synthesis.mode != "none":
        raise ConfigError(f"baseline: {path} must be a plain baseline (no synthesis, no baseline of its own)")
    if not Run(base).pull().finished:
        if train is None:
            return None
        say(cfg.name, f"baseline {base.name}: training it first, {base.train.epochs} epochs ({run_dir(base)})")
        train(base)
    return run_dir(base)


def check_same_test_split(baseline_dir: Path, test_split_id: str) -> None:
    """The per-class change figure compares test accuracies: only over the same test images. (A
    baseline finished before split ids were recorded is not checked.)"""
    recorded = json.loads((Path(baseline_dir) / "metrics.json").read_text()).get("split_ids", {}).get("test")
    if recorded is not None and recorded != test_split_id:
        raise ConfigError(f"baseline: {baseline_dir} was tested on another test split than this run's (another "
                          f"seed, data.split_seed or split setting), so the two cannot be compared class by class; "
                          f"give a baseline run of this split, or remove that folder to train it again")


def diffusion_model(cfg: Config, ds, splits: dict) -> str:
    """The diffusion model IOIS samples from: `diffusion.model_dir`, or, when that is not set, the one
    pretrained for this data, training split, preset and size, which is pretrained here first if
    missing. Refused if it was trained on any of this run's validation or test images."""
    from ioisray.models.diffusion import load_noise_scheduler, load_unet, null_class, saved_null_class
    from ioisray.recipes.pretrain_diffusion import UNET_DIR, diffusion_image_size, pretrain_diffusion

    folder = provenance.data_folder(cfg.data)
    train_keys = provenance.image_keys(ds, splits["train"], folder)
    if cfg.diffusion.model_dir:
        model_dir = cfg.diffusion.model_dir
        try:
            unet = load_unet(model_dir, ds.num_classes)
            load_noise_scheduler(model_dir)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(str(e)) from None
        check_cfg_scale(cfg, model_dir, null_class(unet))
    else:
        size = diffusion_image_size(cfg)
        # Only what shapes the diffusion model goes into its run, so IOIS runs that differ in method,
        # synthesis, training settings or training seed share one model; another split gets its own.
        d = cfg.diffusion
        # Label dropout makes another model (one with a null class): a name of its own, and none added
        # without it, so that the models pretrained before it keep their names.
        tag = (("_v" if d.prediction_type == "v_prediction" else "")
               + ("_cosine" if d.beta_schedule == "squaredcos_cap_v2" else "")
               + (f"_drop{d.label_dropout:g}" if d.label_dropout else ""))
        pre = Config(name=f"diffusion_{cfg.data.name}_{d.preset}_{size}px{tag}_split{provenance.split_id(train_keys)}",
                     seed=cfg.split_seed, output_dir=cfg.output_dir, data=cfg.data, diffusion=cfg.diffusion,
                     pretrain=cfg.pretrain, ray=cfg.ray, train=TrainConfig(precision=cfg.train.precision))
        # Named by its final location (a URI on a cluster), so that actors on any node can load it.
        model_dir = storage.join(run_location(pre), UNET_DIR)
        if storage.exists(model_dir):
            say(cfg.name, f"diffusion model: {model_dir}")
            check_cfg_scale(cfg, model_dir, saved_null_class(model_dir))
        else:
            say(cfg.name, f"diffusion.model_dir is not set: pretraining the diffusion model first, "
                          f"{pre.pretrain.epochs} epochs on the {len(splits['train'])} training images "
                          f"({run_location(pre)})")
            pretrain_diffusion(pre)
    held_out = provenance.image_keys(ds, np.concatenate([splits["val"], splits["test"]]), folder)
    problem = provenance.check_record(storage.fetch_dir(model_dir), train_keys, held_out)
    if problem and problem.startswith("warning: "):
        say(cfg.name, problem)
    elif problem:
        raise ConfigError(
            f"diffusion.model_dir: {problem} (split seed {cfg.split_seed}), so its samples would leak them into "
            f"training. Use a model pretrained on this split (leave diffusion.model_dir unset to pretrain one), or "
            f"keep the model's split with data.split_seed")
    return model_dir


def check_cfg_scale(cfg: Config, model_dir: str, null_label: Optional[int]) -> None:
    """Classifier-free guidance (sampler.cfg_scale != 1) needs the null class of a model pretrained with
    label dropout: refused, naming both, before any synthesis actor loads the model."""
    if cfg.sampler.cfg_scale != 1 and null_label is None:
        raise ConfigError(f"sampler.cfg_scale={cfg.sampler.cfg_scale:g} needs a diffusion model with a null class, "
                          f"but {model_dir} has none (it was pretrained without diffusion.label_dropout): use "
                          f"sampler.cfg_scale=1 or a model pretrained with diffusion.label_dropout > 0")


def check_filter_model(cfg: Config, ds) -> None:
    """synthesis.filter_model: a finished `ioisray train` run of this data's classes and image size (its
    model judges the synthetic images, which are made at data.image_size); checked before any actor
    loads it."""
    from ioisray.models.trained import load_classifier_for

    key = "synthesis.filter_model"
    try:
        load_classifier_for(storage.fetch_dir(cfg.synthesis.filter_model), ds.class_names, cfg.data.image_size, key)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e) if str(e).startswith(key) else f"{key}: {e}") from None


def shared_diffusion_model(cfg: Config, loaded: Optional[dict] = None) -> Config:
    """`cfg` with diffusion.model_dir set when it synthesises: the model every trial of a search or
    benchmark shares, pretrained here (once, before any trial starts) if it does not exist yet, and
    checked against the run's validation and test images before any trial starts. `loaded` keeps the
    last split loaded, so that consecutive runs with the same data and split seed load it once."""
    if cfg.synthesis.mode == "none":
        return cfg
    loaded = {} if loaded is None else loaded
    key = (cfg.data.model_dump_json(), cfg.split_seed)
    if key not in loaded:
        loaded.clear()
        loaded[key] = setup_data(cfg)
    model_dir = diffusion_model(cfg, *loaded[key])
    return cfg.model_copy(update={"diffusion": cfg.diffusion.model_copy(update={"model_dir": model_dir})})
