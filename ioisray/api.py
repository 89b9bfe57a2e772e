"""The commands as functions, for notebooks and scripts: the same configs, overrides, run folders and
one-line errors (ConfigError, ValueError, FileNotFoundError) as the command line, without its exit codes."""
from __future__ import annotations

import csv
import json
import os
from typing import Optional, Sequence

from ioisray.config import Config
from ioisray.config import load_config as _load_config


def load_config(path: Optional[str | os.PathLike] = None, overrides: Sequence[str] = ()) -> Config:
    """Compose a YAML config (None: the built-in defaults), apply `key=value` overrides, validate."""
    return _load_config(path, list(overrides))


def train(cfg: Config) -> dict:
    """`ioisray train`: run (or resume) the run of `cfg`; returns what its metrics.json holds."""
    from ioisray.recipes.console import quiet_ray_data
    from ioisray.recipes.train import train as train_recipe
    from ioisray.run import run_dir

    quiet_ray_data()  # as the command: Ray Data's progress lines stay out of a notebook's output
    train_recipe(cfg)
    return json.loads((run_dir(cfg) / "metrics.json").read_text())


def evaluate(run: str | os.PathLike, overrides: Sequence[str] = (), split: Optional[str] = None,
             name: Optional[str] = None) -> dict:
    """`ioisray evaluate`: test a finished run's best model on its own data (`split`: "train", "val" or
    "test") or other labelled data (`data.*` overrides); returns what the evaluation's metrics.json
    holds, written under <run>/eval/<name>/."""
    from ioisray.recipes.evaluate import evaluate_run

    return evaluate_run(run, list(overrides), split=split, name=name)["metrics"]


def predict(run: str | os.PathLike, paths: Sequence[str | os.PathLike],
            out: Optional[str | os.PathLike] = None) -> list[dict]:
    """`ioisray predict`: the predicted class and class probabilities of image files (and of the images
    below folders), one dict per image; the CSV is written too (`out`, or <run>/predictions/)."""
    from ioisray.recipes.evaluate import predict_images

    with open(predict_images(run, list(paths), out), newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [{"path": r["path"], "predicted": r["predicted"],
             "probabilities": {k[len("prob_"):]: float(v) for k, v in r.items() if k.startswith("prob_")}}
            for r in rows]


__all__ = ["load_config", "train", "evaluate", "predict"]
