"""A finished `ioisray train` run's best classifier, as evaluation, sampling guides and synthesis judges
load it: the architecture from its config.yaml, the weights from best_model.safetensors."""
from __future__ import annotations

import json
from pathlib import Path

from ioisray.config import load_config
from ioisray.models.classifier import build_classifier, load_state_dict_file

BEST_MODEL_FILE = "best_model.safetensors"


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


def load_classifier_for(run: str | Path, class_names: list[str], image_size: int, key: str):
    """`load_classifier_run` of a run that must classify these classes at this image size (a guide or a
    judge of synthetic images); a ValueError naming `key` otherwise."""
    model, run_cfg, names = load_classifier_run(run)
    if names != class_names:
        raise ValueError(f"{key}: {run} classifies {names}, but the data's classes are {class_names}")
    if run_cfg.data.image_size != image_size:
        raise ValueError(f"{key}: {run} was trained at {run_cfg.data.image_size}px, but the images are made at "
                         f"data.image_size={image_size}: set data.image_size to match")
    return model, run_cfg, names
