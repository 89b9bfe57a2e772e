"""One small loader per dataset layout, plus the `load_dataset` factory.

Every loader returns an ImageDataset whose images are decoded by `base.build_dataset`
(PIL, converted to RGB, resized to image_size x image_size; aspect ratio not kept).
"""
from __future__ import annotations

import csv as csvlib
import math
import os
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from .base import SPLIT_NAMES, DataError, ImageDataset, build_dataset, check_image_size, check_on_bad_image

HAM_CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
APTOS_CLASSES = ["0_No_DR", "1_Mild", "2_Moderate", "3_Severe", "4_Proliferate_DR"]
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def read_csv(path: str | Path, required: list[str]) -> list[tuple[int, dict[str, str]]]:
    """Read a CSV into (line number, row) pairs; line numbers count the header as line 1.

    Keys and values are stripped; a missing required column is a DataError.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: CSV file not found")
    # utf-8-sig: tolerate the BOM that spreadsheet exports put before the header.
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csvlib.DictReader(fh)
        found = [(name or "").strip() for name in (reader.fieldnames or [])]
        for col in required:
            if col not in found:
                raise DataError(f"{path}: missing column {col!r}; columns found: {found}")
        rows = []
        for raw in reader:
            row = {(k or "").strip(): (v or "").strip() if isinstance(v, str) else "" for k, v in raw.items()}
            rows.append((reader.line_num, row))  # physical line of the row's end
    return rows


def _where(path: Path, line: int) -> str:
    return f"{path}, line {line} (header is line 1)"


def _class_index(path: Path, line: int, field: str, value: str, class_names: list[str]) -> int:
    if value not in class_names:
        raise DataError(f"{_where(path, line)}: unknown {field} {value!r}; expected one of {class_names}")
    return class_names.index(value)


def _split_value(path: Path, line: int, value: str) -> str:
    if value not in SPLIT_NAMES:
        raise DataError(f"{_where(path, line)}: split {value!r} is not one of {list(SPLIT_NAMES)}")
    return value


def _resolve(base: Path, rel: str) -> str:
    return rel if os.path.isabs(rel) else str(base / rel)


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


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


def load_ham10000(root: str, *, image_size: int, on_bad_image: str = "error",
                  num_threads: int = 4) -> ImageDataset:
    """HAM10000: copy layout `labels.csv` (path, lesion_id, dx) if present, else the official
    `HAM10000_metadata.csv` (image_id, lesion_id, dx) with `<image_id>.jpg` anywhere under root."""
    root_p = Path(root)
    copy_csv, official_csv = root_p / "labels.csv", root_p / "HAM10000_metadata.csv"
    paths, labels, groups = [], [], []
    if copy_csv.is_file():
        for line, row in read_csv(copy_csv, ["path", "lesion_id", "dx"]):
            paths.append(_resolve(root_p, row["path"]))
            labels.append(_class_index(copy_csv, line, "dx", row["dx"], HAM_CLASSES))
            groups.append(row["lesion_id"] or paths[-1])  # no lesion id: the image is its own group
    elif official_csv.is_file():
        rows = read_csv(official_csv, ["image_id", "lesion_id", "dx"])
        # One recursive scan; sorted so duplicated folders (the Kaggle mirror has two copies
        # of each part) resolve to the same file every time.
        found: dict[str, Path] = {}
        for p in sorted(root_p.rglob("*")):
            if p.suffix.lower() == ".jpg" and p.is_file():
                found.setdefault(p.stem, p)
        for line, row in rows:
            image_id = row["image_id"]
            # A missing image gets a descriptive pseudo-path, reported by build_dataset as not found.
            paths.append(str(found.get(image_id, root_p / "**" / f"{image_id}.jpg")))
            labels.append(_class_index(official_csv, line, "dx", row["dx"], HAM_CLASSES))
            groups.append(row["lesion_id"] or paths[-1])
    else:
        raise DataError(f"{root}: neither labels.csv nor HAM10000_metadata.csv found")
    return build_dataset(paths, labels, HAM_CLASSES, image_size=image_size, on_bad_image=on_bad_image,
                         num_threads=num_threads, groups=groups, require_all_classes=True)


def _aptos_grade(path: Path, line: int, value: str) -> int:
    try:
        grade = int(value)
    except ValueError:
        raise DataError(f"{_where(path, line)}: diagnosis {value!r} is not an integer grade 0..4") from None
    if not 0 <= grade < len(APTOS_CLASSES):
        raise DataError(f"{_where(path, line)}: diagnosis {grade} is outside 0..4")
    return grade


def load_aptos(root: str, *, image_size: int, on_bad_image: str = "error",
               num_threads: int = 4) -> ImageDataset:
    """APTOS 2019: copy layout `labels.csv` (path, id_code, diagnosis) if present, else the
    official `train.csv` (id_code, diagnosis) with `train_images/<id_code>.png`."""
    root_p = Path(root)
    copy_csv, official_csv = root_p / "labels.csv", root_p / "train.csv"
    paths, labels = [], []
    if copy_csv.is_file():
        for line, row in read_csv(copy_csv, ["path", "id_code", "diagnosis"]):
            paths.append(_resolve(root_p, row["path"]))
            labels.append(_aptos_grade(copy_csv, line, row["diagnosis"]))
    elif official_csv.is_file():
        for line, row in read_csv(official_csv, ["id_code", "diagnosis"]):
            paths.append(str(root_p / "train_images" / f"{row['id_code']}.png"))
            labels.append(_aptos_grade(official_csv, line, row["diagnosis"]))
    else:
        raise DataError(f"{root}: neither labels.csv nor train.csv found")
    return build_dataset(paths, labels, APTOS_CLASSES, image_size=image_size, on_bad_image=on_bad_image,
                         num_threads=num_threads, require_all_classes=True)


def _load_medmnist_npz(path: Path, class_names: list[str], image_size: int) -> ImageDataset:
    """MedMNIST's own file (e.g. `dermamnist.npz`): <split>_images (N, H, W[, 3]) uint8 and
    <split>_labels (N, 1) for train/val/test. Read without pickle, one split at a time."""
    def bad(why) -> DataError:
        return DataError(f"{path}: not a MedMNIST .npz (<split>_images / <split>_labels for {list(SPLIT_NAMES)}): {why}")

    try:
        with np.load(path, allow_pickle=False) as npz:
            labels = {s: npz[f"{s}_labels"].reshape(-1).astype(np.int64) for s in SPLIT_NAMES}
            total = sum(len(v) for v in labels.values())
            images = np.empty((total, image_size, image_size, 3), dtype=np.uint8)
            sources, splits, row = [], [], 0
            for split in SPLIT_NAMES:
                imgs, labs = npz[f"{split}_images"], labels[split]
                if len(imgs) != len(labs) or (len(labs) and not 0 <= labs.min() <= labs.max() < len(class_names)):
                    raise bad(f"{split}_labels must be one class index in [0, {len(class_names)}) per image")
                for i, img in enumerate(imgs):
                    rgb = Image.fromarray(img).convert("RGB")
                    if rgb.size != (image_size, image_size):
                        rgb = rgb.resize((image_size, image_size), Image.Resampling.BICUBIC)
                    images[row] = np.asarray(rgb, dtype=np.uint8)
                    row += 1
                # Named like files inside the .npz, so that they are paths relative to its folder.
                sources += [f"{path}[{split}][{i}]" for i in range(len(labs))]
                splits += [split] * len(labs)
    except DataError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise bad(e) from None
    return ImageDataset(images=images, labels=np.concatenate([labels[s] for s in SPLIT_NAMES]),
                        class_names=list(class_names), sources=sources, official_split=np.asarray(splits, dtype=str))


def load_dermamnist(root: str, *, image_size: int, on_bad_image: str = "error",
                    num_threads: int = 4) -> ImageDataset:
    """DermaMNIST: MedMNIST's `dermamnist*.npz` (root is the file, or a folder holding one), else
    `labels.csv` (path, dx, split), else `<split>/<dx>/*.jpg` folders. Sets official_split."""
    root_p = Path(root)
    npz = [root_p] if root_p.suffix == ".npz" else sorted(root_p.glob("dermamnist*.npz"))
    if root_p.suffix == ".npz" and not root_p.is_file():
        raise DataError(f"{root}: file not found")
    if len(npz) > 1:
        raise DataError(f"{root}: several DermaMNIST files ({', '.join(p.name for p in npz)}); give one as data.root")
    if npz:
        return _load_medmnist_npz(npz[0], HAM_CLASSES, image_size)
    label_csv = root_p / "labels.csv"
    paths, labels, splits = [], [], []
    if label_csv.is_file():
        for line, row in read_csv(label_csv, ["path", "dx", "split"]):
            paths.append(_resolve(root_p, row["path"]))
            labels.append(_class_index(label_csv, line, "dx", row["dx"], HAM_CLASSES))
            splits.append(_split_value(label_csv, line, row["split"]))
    else:
        for split in SPLIT_NAMES:
            split_dir = root_p / split
            if not split_dir.is_dir():
                continue
            for class_dir in sorted(d for d in split_dir.iterdir() if d.is_dir()):
                if class_dir.name not in HAM_CLASSES:
                    raise DataError(f"{class_dir}: unknown class directory; expected one of {HAM_CLASSES}")
                for p in sorted(class_dir.iterdir()):
                    if _is_image(p):
                        paths.append(str(p))
                        labels.append(HAM_CLASSES.index(class_dir.name))
                        splits.append(split)
        if not paths:
            raise DataError(f"{root}: no labels.csv and no images under {root}/<train|val|test>/<class>/")
    return build_dataset(paths, labels, HAM_CLASSES, image_size=image_size, on_bad_image=on_bad_image,
                         num_threads=num_threads, official_split=splits, require_all_classes=True)


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
        files = sorted(p for p in class_dir.rglob("*") if _is_image(p))
        if not files:
            raise DataError(f"{class_dir}: class directory has no image files "
                            f"(extensions {sorted(IMAGE_EXTENSIONS)})")
        paths += [str(p) for p in files]
        labels += [c] * len(files)
    return build_dataset(paths, labels, [d.name for d in class_dirs], image_size=image_size,
                         on_bad_image=on_bad_image, num_threads=num_threads)


def load_csv(root: str | None = None, *, csv: str | None = None, image_size: int,
             on_bad_image: str = "error", num_threads: int = 4) -> ImageDataset:
    """CSV with columns path,label (+ optional group, split); paths relative to the CSV's folder.
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
            raise DataError(f"{_where(csv_path, line)}: empty label")
        if not row["path"]:
            raise DataError(f"{_where(csv_path, line)}: empty path")
    names = {row["label"] for _, row in rows}
    try:  # integer labels sort numerically ("2" before "10"), anything else as text
        class_names = sorted(names, key=lambda s: (int(s), s))
    except ValueError:
        class_names = sorted(names)
    index = {name: i for i, name in enumerate(class_names)}
    base = csv_path.parent
    paths = [_resolve(base, row["path"]) for _, row in rows]
    return build_dataset(
        paths, [index[row["label"]] for _, row in rows], class_names,
        image_size=image_size, on_bad_image=on_bad_image, num_threads=num_threads,
        groups=[row["group"] or p for (_, row), p in zip(rows, paths)] if has_group else None,
        official_split=[_split_value(csv_path, line, row["split"]) for line, row in rows] if has_split else None,
    )


LOADERS: dict[str, Callable[..., ImageDataset]] = {
    "digits_lt": load_digits_lt,
    "ham10000": load_ham10000,
    "aptos": load_aptos,
    "dermamnist": load_dermamnist,
    "imagefolder": load_imagefolder,
    "csv": load_csv,
}


def load_dataset(name: str, root: str | None = None, *, image_size: int, csv: str | None = None,
                 on_bad_image: str = "error", imbalance_ratio: float = 50.0, seed: int = 0,
                 num_threads: int = 4) -> ImageDataset:
    """Load dataset `name` (a key of LOADERS); options a loader does not use are ignored."""
    if name not in LOADERS:
        raise DataError(f"unknown dataset {name!r}; known: {sorted(LOADERS)}")
    check_on_bad_image(on_bad_image)  # validate up front, even for loaders that read no files
    common = dict(image_size=image_size, on_bad_image=on_bad_image, num_threads=num_threads)
    if name == "digits_lt":
        return load_digits_lt(root, imbalance_ratio=imbalance_ratio, seed=seed, **common)
    if name == "csv":
        return load_csv(root, csv=csv, **common)
    if root is None:
        raise DataError(f"dataset {name!r} needs a root directory")
    return LOADERS[name](root, **common)
