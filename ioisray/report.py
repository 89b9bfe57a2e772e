"""Figures of a finished run, as PNG (written atomically): the paper's Figure 2 (per-class accuracy
change against a baseline run), Figure 3 (real vs synthetic images per class), and the confusion
matrix of an evaluation."""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ioisray.atomic import atomic_write_bytes

PER_CLASS_CHANGE_PNG = "per_class_accuracy_change.png"
REAL_VS_SYNTHETIC_PNG = "real_vs_synthetic.png"
CONFUSION_MATRIX_PNG = "confusion_matrix.png"


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def per_class_change(class_names: Sequence[str], accuracy: Sequence[float], baseline: Sequence[float],
                     path: Path, title: str) -> Path:
    """Bars of (accuracy - baseline) per class on the test split, in percentage points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    delta = 100 * (np.asarray(accuracy, dtype=float) - np.asarray(baseline, dtype=float))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(class_names) + 1.5), 3.2))
    ax.bar(range(len(delta)), delta, color=["tab:green" if d >= 0 else "tab:red" for d in delta])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(delta)), class_names, rotation=45 if len(class_names) > 6 else 0, ha="right")
    ax.set_ylabel("test accuracy change (pp)")
    ax.set_title(title, fontsize=9)
    for i, d in enumerate(delta):
        ax.annotate(f"{d:+.1f}", (i, d), ha="center", va="bottom" if d >= 0 else "top", fontsize=7)
    return _save(fig, path)


def per_class_change_from_runs(run_dir: Path, baseline_dir: Path) -> Path:
    """Figure 2 for a finished run against a finished baseline run of the same classes."""
    run, base = (json.loads((Path(d) / "metrics.json").read_text()) for d in (run_dir, baseline_dir))
    if run["class_names"] != base["class_names"]:
        raise ValueError(f"baseline_run {baseline_dir}: classes {base['class_names']} differ from "
                         f"{run['class_names']}")
    names = run["class_names"]
    acc = [run["test"]["per_class_accuracy"][n] for n in names]
    ref = [base["test"]["per_class_accuracy"][n] for n in names]
    title = (f"{Path(run_dir).name} vs {Path(baseline_dir).name}: test BACC "
             f"{run['test']['balanced_accuracy']:.3f} vs {base['test']['balanced_accuracy']:.3f}")
    return per_class_change(names, acc, ref, Path(run_dir) / PER_CLASS_CHANGE_PNG, title)


def real_vs_synthetic(class_names: Sequence[str], real: Sequence[np.ndarray], synthetic: Sequence[np.ndarray],
                      path: Path) -> Path:
    """One row per class: real training images on the left, synthetic ones on the right (uint8 HWC).
    Each side is one tiled image (two axes, not one per image: 160 axes took 3 of the 4.6 s it cost)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = max([len(r) for r in real] + [len(s) for s in synthetic] + [1])
    shown = [np.asarray(im) for images in (*real, *synthetic) for im in images]
    cell = (max([im.shape[0] for im in shown] + [1]), max([im.shape[1] for im in shown] + [1]))
    fig, axes = plt.subplots(1, 2, figsize=(2 * k * 0.8, len(class_names) * 0.85), squeeze=False)
    for ax, side, title in zip(axes[0], (real, synthetic), ("real", "synthetic (last epoch)")):
        ax.imshow(_mosaic(side, k, cell), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(title, fontsize=8, loc="left")
    axes[0, 0].set_yticks([_GAP + r * (cell[0] + _GAP) + cell[0] / 2 for r in range(len(class_names))],
                          list(class_names), fontsize=8)
    return _save(fig, path)


_GAP = 2  # white pixels between tiles


def _mosaic(rows: Sequence[np.ndarray], k: int, cell: tuple[int, int]) -> np.ndarray:
    """Row r: the images of rows[r] (at most k), each top-left in a `cell`-sized tile, on white."""
    h, w = cell
    out = np.full((len(rows) * (h + _GAP) + _GAP, k * (w + _GAP) + _GAP, 3), 255, np.uint8)
    for r, images in enumerate(rows):
        for j, image in enumerate(list(images)[:k]):
            image = np.asarray(image)
            image = np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image[..., :3]
            y, x = _GAP + r * (h + _GAP), _GAP + j * (w + _GAP)
            out[y:y + image.shape[0], x:x + image.shape[1]] = image
    return out


def confusion_matrix(class_names: Sequence[str], matrix: Sequence[Sequence[int]], path: Path, title: str) -> Path:
    """Rows: true class, columns: predicted class. Colours are row-normalised (each class's recall
    pattern stays visible however rare the class); the cells show the counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(matrix, dtype=np.int64)
    rows = counts.sum(axis=1, keepdims=True)
    share = counts / np.maximum(rows, 1)  # a class without images stays a white row
    side = max(3.0, 0.55 * len(class_names) + 1.5)
    fig, ax = plt.subplots(figsize=(side + 0.8, side))
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ticks = range(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=45 if len(class_names) > 4 else 0, ha="right")
    ax.set_yticks(ticks, class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    for (i, j), n in np.ndenumerate(counts):
        ax.annotate(str(n), (j, i), ha="center", va="center", fontsize=7,
                    color="white" if share[i, j] > 0.5 else "black")
    return _save(fig, path)


def tensorboard_scalars(writer, prefix: str, metrics: dict, epoch: int) -> None:
    """Every number of `metrics` as `<prefix>/<key>`, and per-class accuracies as `<prefix>_per_class/<class>`."""
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            writer.add_scalar(f"{prefix}/{k}", v, epoch)
        elif isinstance(v, dict) and k == "per_class_accuracy":
            for name, acc in v.items():
                if not np.isnan(acc):
                    writer.add_scalar(f"{prefix}_per_class/{name}", acc, epoch)


def tensorboard_synthesis(writer, class_names: Sequence[str], synthesis: dict, examples: list, epoch: int) -> None:
    """An IOIS epoch: quotas (and images filtered out) per class, images/s per actor, the timing of the
    synthetic stream, and a grid of the epoch's synthetic images, one row per class that received any."""
    from torchvision.utils import make_grid

    for name, q in zip(class_names, synthesis["quotas"]):
        writer.add_scalar(f"synthesis_quota/{name}", int(q), epoch)
    for name, n in zip(class_names, synthesis.get("filtered_per_class", [])):  # synthesis.filter's drops
        writer.add_scalar(f"synthesis_filtered/{name}", int(n), epoch)
    for a, rate in enumerate(synthesis.get("images_per_second_per_actor", [])):
        writer.add_scalar(f"synthesis/images_per_second_actor_{a}", rate, epoch)
    for key in ("seconds_to_first_synthetic", "seconds_to_first_batch", "seconds_to_first_chunk", "generation_seconds"):
        if synthesis.get(key) is not None:
            writer.add_scalar(f"synthesis/{key}", synthesis[key], epoch)
    rows = [t for t in examples if len(t)]
    if rows:
        k = max(len(t) for t in rows)
        padded = [torch.cat([t, torch.zeros((k - len(t), *t.shape[1:]), dtype=t.dtype)]) for t in rows]
        grid = make_grid(torch.cat(padded).permute(0, 3, 1, 2), nrow=k, padding=1)
        writer.add_image("synthesis/images_per_class", grid, epoch)
