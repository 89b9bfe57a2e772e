"""Recipes: test a finished `ioisray train` run's best model on other data, or predict unlabelled images.
Plain PyTorch in this process (no Ray); CPU, or CUDA with `ray.use_gpu=true`.

    evaluate  any labelled dataset (the run's config with `data.*` overrides), all of it or one split;
              classes are matched by name, and the results go to <run>/eval/<name>/: metrics.json,
              metrics.md, confusion_matrix.png and predictions.csv. The run's own files are never touched.
    predict   image files or folders (searched recursively): a CSV of predicted classes and probabilities
"""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

from ioisray import report
from ioisray.atomic import atomic_write_text
from ioisray.config import Config, ConfigError, apply_overrides, build_config
from ioisray.data import DataError, ImageDataset, decode_image, load_dataset, provenance, split_dataset
from ioisray.data.base import SPLIT_NAMES, decode_error
from ioisray.data.loaders import IMAGE_EXTENSIONS
from ioisray.engine import numpy_batches, predict
from ioisray.metrics import classification_metrics, format_table, predictions_csv
from ioisray.models.trained import load_classifier_run

EVAL_DIR = "eval"
PREDICTIONS_DIR = "predictions"
# What may change for an evaluation: the data, where it runs, and the batch size. The architecture and
# the image size are the run's (data.image_size is set to it: the model only knows that size).
OVERRIDABLE = ("data.", "ray.", "train.batch_size")
RUN_OWN_FILES = ("config.yaml", "metrics.json", "metrics.md", "best_model.safetensors")


@dataclass
class ClassMatch:
    """The model's classes and the data's, matched by name (their order and count may differ)."""
    model_classes: list[str]
    data_classes: list[str]

    @property
    def unknown(self) -> list[str]:  # in the data, not known to the model: their rows are left out
        return [c for c in self.data_classes if c not in self.model_classes]

    @property
    def missing(self) -> list[str]:  # known to the model, absent from the data: no support
        return [c for c in self.model_classes if c not in self.data_classes]

    def to_model_labels(self, data_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mask of the rows whose class the model knows, their labels as the model's class indices)."""
        index = np.array([self.model_classes.index(c) if c in self.model_classes else -1
                          for c in self.data_classes], dtype=np.int64)
        model_labels = index[data_labels]
        keep = model_labels >= 0
        return keep, model_labels[keep]


def match_classes(model_classes: Sequence[str], data_classes: Sequence[str]) -> ClassMatch:
    match = ClassMatch(list(model_classes), list(data_classes))
    if len(match.unknown) == len(match.data_classes):
        raise DataError(f"the data shares no class with the model: data classes {match.data_classes}, "
                        f"model classes {match.model_classes}")
    return match


def eval_config(run_cfg: Config, overrides: Sequence[str], source: str) -> Config:
    """The run's config with the evaluation's overrides. Bad images are refused unless the overrides
    ask to skip them, whatever the run trained with: an evaluation should not quietly lose images."""
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key == "data.image_size" or not key.startswith(OVERRIDABLE):
            raise ConfigError(f"override {item!r}: evaluate takes data.* (but data.image_size, which is the run's "
                              f"{run_cfg.data.image_size}px), ray.* and train.batch_size")
    raw = run_cfg.model_dump(mode="json")
    raw["data"]["on_bad_image"] = "error"
    raw = apply_overrides(raw, list(overrides))
    raw["data"]["image_size"] = run_cfg.data.image_size
    return build_config(raw, source=f"{source} with overrides {list(overrides)}")


def device_of(cfg: Config) -> torch.device:
    return torch.device("cuda" if cfg.ray.use_gpu and torch.cuda.is_available() else "cpu")


def inference_model(model: torch.nn.Module, run_cfg: Config, device: torch.device) -> torch.nn.Module:
    """The model on `device` in the memory format the run trained (and evaluated) it in."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if run_cfg.train.channels_last else model


def data_source(cfg: Config) -> str:
    d = cfg.data
    return d.csv or d.root or f"{d.name} (embedded)"


def default_eval_name(cfg: Config, split: Optional[str]) -> str:
    """The dataset's folder name (or CSV's, or data.name for embedded data), plus `_<split>`."""
    d = cfg.data
    if d.csv:
        csv_path = Path(d.csv)
        base = csv_path.parent.name if csv_path.stem == "labels" else csv_path.stem  # labels.csv says little
    else:
        base = Path(d.root).stem if d.root else d.name
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base).lstrip(".") or d.name
    return f"{base}_{split}" if split else base


def check_eval_name(name: str) -> str:
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise ConfigError(f"--name {name!r}: must be a plain folder name (no '/', not starting with '.')")
    return name


def load_rows(cfg: Config, split: Optional[str]) -> tuple[ImageDataset, Optional[str]]:
    """The dataset at the run's image size, or its `split` as the run's split seed makes it; and the
    split id of those images (the run records its own splits' ids, so a match can be told)."""
    d = cfg.data
    ds = load_dataset(d.name, d.root, image_size=d.image_size, csv=d.csv, on_bad_image=d.on_bad_image,
                      imbalance_ratio=d.imbalance_ratio, seed=cfg.split_seed, num_threads=d.num_threads)
    rows = ds.distinct_rows()  # an image listed twice is evaluated once
    if split is not None:
        if split not in SPLIT_NAMES:
            raise ConfigError(f"--split {split!r}: one of {list(SPLIT_NAMES)}")
        rows = split_dataset(ds, val_fraction=d.val_fraction, test_fraction=d.test_fraction,
                             seed=cfg.split_seed)[split]
        if not len(rows):
            raise DataError(f"the {split} split of {data_source(cfg)} is empty")
    if len(rows) != len(ds.labels):
        ds = ds.subset(rows)
    return ds, provenance.split_id(provenance.image_keys(ds, np.arange(len(ds.labels)), provenance.data_folder(d)))


def class_warning(match: ClassMatch, left_out: dict[str, int]) -> Optional[str]:
    if not (match.unknown or match.missing):
        return None
    return (f"data classes unknown to the model: {match.unknown} ({sum(left_out.values())} images left out); "
            f"model classes missing from the data: {match.missing}; evaluating the images of the "
            f"{len(match.model_classes) - len(match.missing)} shared classes")


def write_evaluation(out_dir: Path, title: str, metrics: dict, sources: list[str], probs: np.ndarray,
                     labels: np.ndarray) -> str:
    """metrics.json, metrics.md, confusion_matrix.png and predictions.csv (each atomic); returns the table."""
    names = metrics["class_names"]
    table = format_table({out_dir.name: metrics}, names)
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2))
    atomic_write_text(out_dir / "metrics.md", table + "\n")
    report.confusion_matrix(names, metrics["confusion_matrix"], out_dir / report.CONFUSION_MATRIX_PNG,
                            f"{title}: BACC {metrics['balanced_accuracy']:.3f}")
    atomic_write_text(out_dir / "predictions.csv", predictions_csv(sources, probs, names, labels))
    return table


def evaluate_run(run: str | Path, overrides: Sequence[str] = (), split: Optional[str] = None,
                 name: Optional[str] = None) -> dict:
    """Evaluate the best model of `run`; returns {"out_dir", "metrics", "table", "warnings"}."""
    run = Path(run)
    model, run_cfg, model_classes = load_classifier_run(run)
    cfg = eval_config(run_cfg, overrides, str(run / "config.yaml"))
    name = check_eval_name(name) if name is not None else default_eval_name(cfg, split)
    ds, split_id = load_rows(cfg, split)
    match = match_classes(model_classes, ds.class_names)
    keep, labels = match.to_model_labels(ds.labels)
    if not keep.any():  # shared classes, but none of their images in this split
        raise DataError(f"{data_source(cfg)}: no image of a class the model knows in the {split} split")
    left_out = {c: int(n) for c, n in zip(ds.class_names, ds.class_counts()) if c in match.unknown}
    warnings = [w for w in [class_warning(match, left_out)] if w]
    if ds.skipped:
        warnings.append(f"{len(ds.skipped)} unreadable images skipped (data.on_bad_image=skip), "
                        f"e.g. {ds.skipped[0][0]}")
    device = device_of(cfg)
    print(f"[ioisray] evaluate {run}: {int(keep.sum())} images of {data_source(cfg)}"
          f"{f' ({split} split)' if split else ''} on {device}", flush=True)
    # As the run evaluated its own splits: the same batches, memory format and (float32) precision.
    batches = numpy_batches(ds.images[keep], labels, cfg.train.batch_size * 2)
    _, probs = predict(inference_model(model, run_cfg, device), batches, device)
    run_split_ids = json.loads((run / "metrics.json").read_text()).get("split_ids", {})
    metrics = {
        **classification_metrics(labels, probs, model_classes),
        "class_names": model_classes, "data_class_names": ds.class_names,
        "class_mapping": {c: (c if c in model_classes else None) for c in ds.class_names},
        "unknown_classes": match.unknown, "missing_classes": match.missing, "rows_left_out": left_out,
        "skipped_images": [list(s) for s in ds.skipped], "data_source": data_source(cfg),
        "data": cfg.data.model_dump(mode="json"), "split": split, "split_seed": cfg.split_seed,
        # Whether these are exactly the images of one of the run's own splits (e.g. its test split).
        "split_id": split_id,
        "same_images_as_run_split": next((k for k, v in run_split_ids.items() if v == split_id), None),
        "run": str(run), "device": str(device)}
    out_dir = run / EVAL_DIR / name
    paths = provenance.relative_paths([s for s, k in zip(ds.sources, keep) if k], provenance.data_folder(cfg.data))
    table = write_evaluation(out_dir, f"{run.name} on {name}", metrics, paths, probs, labels)
    return {"out_dir": out_dir, "metrics": metrics, "table": table, "warnings": warnings}


def image_files(inputs: Iterable[str | Path]) -> list[str]:
    """Files as given, and the image files below folders (sorted, recursive); each once, in order."""
    found: list[str] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files = sorted(str(p) for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not files:
                raise DataError(f"{item}: no image files (extensions {sorted(IMAGE_EXTENSIONS)})")
            found += files
        elif item.is_file():
            found.append(str(item))
        elif item.exists():  # a FIFO, a socket, a device: reading it could block or never end
            raise DataError(f"{item}: not a regular file")
        else:
            raise DataError(f"{item}: file not found")
    return list(dict.fromkeys(found))


def decode_or_refuse(path: str, image_size: int) -> np.ndarray:
    try:
        return decode_image(path, image_size)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
        raise DataError(f"{path}: cannot decode image ({type(e).__name__}: {decode_error(e)})") from None


def image_batches(paths: Sequence[str], image_size: int, batch_size: int, threads: int) -> Iterator[dict]:
    """Batches decoded as training decoded its images; one batch in memory at a time. The labels are
    placeholders: `predict` passes them through, and unlabelled images have none."""
    with ThreadPoolExecutor(threads) as pool:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            images = np.stack(list(pool.map(lambda p: decode_or_refuse(p, image_size), chunk)))
            yield {"image": torch.from_numpy(images), "label": torch.zeros(len(chunk), dtype=torch.long)}


def predict_images(run: str | Path, inputs: Sequence[str | Path], out: Optional[str | Path] = None) -> Path:
    """Predict the classes of unlabelled images with the best model of `run`; returns the CSV's path."""
    run = Path(run)
    model, cfg, class_names = load_classifier_run(run)
    if out is not None and Path(out).resolve() in {(run / f).resolve() for f in RUN_OWN_FILES}:
        raise ConfigError(f"--out {out}: that is one of the run's own files")
    out = Path(out) if out is not None else run / PREDICTIONS_DIR / f"{datetime.now():%Y%m%d-%H%M%S}.csv"
    paths = image_files(inputs)
    device = device_of(cfg)
    print(f"[ioisray] predict {run}: {len(paths)} images on {device}", flush=True)
    batches = image_batches(paths, cfg.data.image_size, cfg.train.batch_size * 2, cfg.data.num_threads)
    _, probs = predict(inference_model(model, cfg, device), batches, device)
    atomic_write_text(out, predictions_csv(paths, probs, class_names))
    return out
