"""Loaders for layouts that are not one dataset's: the embedded long-tailed digits, an ImageFolder
tree and a path,label CSV."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..base import DataError, ImageDataset, build_dataset, check_image_size, check_on_bad_image
from .registry import register
from .rows import IMAGE_EXTENSIONS, is_image, path_column, read_csv, split_value, where


@register("digits_lt")
def load_digits_lt(root: str | None = None, *, image_size: int, imbalance_ratio: float = 50.0,
                   seed: int = 0, on_bad_image: str = "error", num_threads: int = 4) -> ImageDataset:
    """Long-tailed sklearn digits (bundled with scikit-learn, no files; `root` is ignored).

    Class c keeps floor(n_max * imbalance_ratio ** (-c / 9)) images (at least 1), n_max being
    the smallest class's full count, chosen at random with `seed`.
    """
    from sklearn.datasets import load_digits

    check_on_bad_image(on_bad_image)
    check_image_size(image_size)
    if not isinstance(imbalance_ratio, (int, float)) or not imbalance_ratio >= 1:  # also rejects NaN
        raise DataError(f"option imbalance_ratio must be >= 1, got {imbalance_ratio!r}")
    digits = load_digits()
    rng = np.random.default_rng(seed)
    n_max = int(np.bincount(digits.target).min())
    keep = []
    for c in range(10):
        # Small epsilon so e.g. 2.9999999 from float pow still floors to 3.
        n_c = max(1, math.floor(n_max * float(imbalance_ratio) ** (-c / 9) + 1e-9))
        keep.append(np.sort(rng.choice(np.flatnonzero(digits.target == c), n_c, replace=False)))
    idx = np.concatenate(keep)
    pixels = np.clip(np.rint(digits.images[idx] * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    images = np.stack([
        np.asarray(Image.fromarray(p).convert("RGB").resize(
            (image_size, image_size), Image.Resampling.BICUBIC), dtype=np.uint8)
        for p in pixels
    ])
    return ImageDataset(images=images, labels=digits.target[idx].astype(np.int64),
                        class_names=[str(c) for c in range(10)],
                        sources=[f"sklearn-digits[{i}]" for i in idx])


@register("imagefolder")
def load_imagefolder(root: str, *, image_size: int, on_bad_image: str = "error",
                     num_threads: int = 4) -> ImageDataset:
    """Generic `root/<class>/<images>` tree (searched recursively inside each class);
    class names are the sorted subdirectory names."""
    root_p = Path(root)
    if not root_p.is_dir():
        raise DataError(f"{root}: not a directory")
    class_dirs = sorted(d for d in root_p.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{root}: no class subdirectories found")
    paths, labels = [], []
    for c, class_dir in enumerate(class_dirs):
        files = sorted(p for p in class_dir.rglob("*") if is_image(p))
        if not files:
            raise DataError(f"{class_dir}: class directory has no image files "
                            f"(extensions {sorted(IMAGE_EXTENSIONS)})")
        paths += [str(p) for p in files]
        labels += [c] * len(files)
    return build_dataset(paths, labels, [d.name for d in class_dirs], image_size=image_size,
                         on_bad_image=on_bad_image, num_threads=num_threads, source=str(root))


@register("csv")
def load_csv(root: str | None = None, *, csv: str | None = None, image_size: int,
             on_bad_image: str = "error", num_threads: int = 4, allow_outside_root: bool = False) -> ImageDataset:
    """CSV with columns path,label (+ optional group, split); paths relative to the CSV's folder,
    and inside `root` (without a root: inside the CSV's folder) unless allow_outside_root.
    Uses `csv`, else `root/labels.csv`."""
    if csv is None:
        if root is None:
            raise DataError("dataset 'csv' needs the csv option or a root holding labels.csv")
        csv = os.path.join(root, "labels.csv")
    csv_path = Path(csv)
    rows = read_csv(csv_path, ["path", "label"])
    has_group = bool(rows) and "group" in rows[0][1]
    has_split = bool(rows) and "split" in rows[0][1]
    for line, row in rows:
        if not row["label"]:
            raise DataError(f"{where(csv_path, line)}: empty label")
        if not row["path"]:
            raise DataError(f"{where(csv_path, line)}: empty path")
    names = {row["label"] for _, row in rows}
    try:  # integer labels sort numerically ("2" before "10"), anything else as text
        class_names = sorted(names, key=lambda s: (int(s), s))
    except ValueError:
        class_names = sorted(names)
    index = {name: i for i, name in enumerate(class_names)}
    image_path = path_column(csv_path, csv_path.parent, Path(root) if root else csv_path.parent, allow_outside_root)
    paths = [image_path(line, row["path"]) for line, row in rows]
    return build_dataset(
        paths, [index[row["label"]] for _, row in rows], class_names,
        image_size=image_size, on_bad_image=on_bad_image, num_threads=num_threads,
        groups=[row["group"] or p for (_, row), p in zip(rows, paths)] if has_group else None,
        official_split=[split_value(csv_path, line, row["split"]) for line, row in rows] if has_split else None,
        origins=[f"{csv_path}, line {line}" for line, _ in rows], source=str(csv_path),
    )
