"""Loaders for the medical datasets' own layouts: HAM10000, APTOS 2019 and DermaMNIST.

Images are decoded by `base.build_dataset` (PIL, converted to RGB, resized to image_size x
image_size; aspect ratio not kept).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..base import SPLIT_NAMES, DataError, ImageDataset, build_dataset
from .registry import register
from .rows import class_index, is_image, path_column, read_csv, split_value, where

HAM_CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
APTOS_CLASSES = ["0_No_DR", "1_Mild", "2_Moderate", "3_Severe", "4_Proliferate_DR"]


@register("ham10000")
def load_ham10000(root: str, *, image_size: int, on_bad_image: str = "error", num_threads: int = 4,
                  allow_outside_root: bool = False) -> ImageDataset:
    """HAM10000: copy layout `labels.csv` (path, lesion_id, dx) if present, else the official
    `HAM10000_metadata.csv` (image_id, lesion_id, dx) with `<image_id>.jpg` anywhere under root."""
    root_p = Path(root)
    copy_csv, official_csv = root_p / "labels.csv", root_p / "HAM10000_metadata.csv"
    paths, labels, groups = [], [], []
    if copy_csv.is_file():
        image_path = path_column(copy_csv, root_p, root_p, allow_outside_root)
        for line, row in read_csv(copy_csv, ["path", "lesion_id", "dx"]):
            paths.append(image_path(line, row["path"]))
            labels.append(class_index(copy_csv, line, "dx", row["dx"], HAM_CLASSES))
            groups.append(row["lesion_id"] or paths[-1])  # no lesion id: the image is its own group
    elif official_csv.is_file():
        rows = read_csv(official_csv, ["image_id", "lesion_id", "dx"])
        # One recursive scan; sorted so duplicated folders (the Kaggle mirror has two copies
        # of each part) resolve to the same file every time.
        found: dict[str, Path] = {}
        for p in sorted(root_p.rglob("*")):
            if p.suffix.lower() == ".jpg" and is_image(p):
                found.setdefault(p.stem, p)
        for line, row in rows:
            image_id = row["image_id"]
            # A missing image gets a descriptive pseudo-path, reported by build_dataset as not found.
            paths.append(str(found.get(image_id, root_p / "**" / f"{image_id}.jpg")))
            labels.append(class_index(official_csv, line, "dx", row["dx"], HAM_CLASSES))
            groups.append(row["lesion_id"] or paths[-1])
    else:
        raise DataError(f"{root}: neither labels.csv nor HAM10000_metadata.csv found")
    return build_dataset(paths, labels, HAM_CLASSES, image_size=image_size, on_bad_image=on_bad_image,
                         num_threads=num_threads, groups=groups, require_all_classes=True,
                         source=str(copy_csv if copy_csv.is_file() else official_csv))


def _aptos_grade(path: Path, line: int, value: str) -> int:
    try:
        grade = int(value)
    except ValueError:
        raise DataError(f"{where(path, line)}: diagnosis {value!r} is not an integer grade 0..4") from None
    if not 0 <= grade < len(APTOS_CLASSES):
        raise DataError(f"{where(path, line)}: diagnosis {grade} is outside 0..4")
    return grade


@register("aptos")
def load_aptos(root: str, *, image_size: int, on_bad_image: str = "error", num_threads: int = 4,
               allow_outside_root: bool = False) -> ImageDataset:
    """APTOS 2019: copy layout `labels.csv` (path, id_code, diagnosis) if present, else the
    official `train.csv` (id_code, diagnosis) with `train_images/<id_code>.png`."""
    root_p = Path(root)
    copy_csv, official_csv = root_p / "labels.csv", root_p / "train.csv"
    paths, labels = [], []
    if copy_csv.is_file():
        image_path = path_column(copy_csv, root_p, root_p, allow_outside_root)
        for line, row in read_csv(copy_csv, ["path", "id_code", "diagnosis"]):
            paths.append(image_path(line, row["path"]))
            labels.append(_aptos_grade(copy_csv, line, row["diagnosis"]))
    elif official_csv.is_file():
        for line, row in read_csv(official_csv, ["id_code", "diagnosis"]):
            paths.append(str(root_p / "train_images" / f"{row['id_code']}.png"))
            labels.append(_aptos_grade(official_csv, line, row["diagnosis"]))
    else:
        raise DataError(f"{root}: neither labels.csv nor train.csv found")
    return build_dataset(paths, labels, APTOS_CLASSES, image_size=image_size, on_bad_image=on_bad_image,
                         num_threads=num_threads, require_all_classes=True,
                         source=str(copy_csv if copy_csv.is_file() else official_csv))


def _load_medmnist_npz(path: Path, class_names: list[str], image_size: int) -> ImageDataset:
    """MedMNIST's own file (e.g. `dermamnist.npz`): <split>_images (N, H, W[, 3]) uint8 and
    <split>_labels (N, 1) for train/val/test. Read without pickle, one split at a time."""
    def bad(why) -> DataError:
        return DataError(f"{path}: not a MedMNIST .npz (<split>_images / <split>_labels for {list(SPLIT_NAMES)}): {why}")

    if not path.is_file():  # np.load would wait forever on a FIFO
        raise DataError(f"{path}: not a regular file")
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


@register("dermamnist")
def load_dermamnist(root: str, *, image_size: int, on_bad_image: str = "error", num_threads: int = 4,
                    allow_outside_root: bool = False) -> ImageDataset:
    """DermaMNIST: MedMNIST's `dermamnist*.npz` (root is the file, or a folder holding one), else
    `labels.csv` (path, dx, split), else `<split>/<dx>/*.jpg` folders. Sets official_split."""
    root_p = Path(root)
    npz = [root_p] if root_p.suffix == ".npz" else sorted(root_p.glob("dermamnist*.npz"))
    if root_p.suffix == ".npz" and not root_p.exists():
        raise DataError(f"{root}: file not found")
    if len(npz) > 1:
        raise DataError(f"{root}: several DermaMNIST files ({', '.join(p.name for p in npz)}); give one as data.root")
    if npz:
        return _load_medmnist_npz(npz[0], HAM_CLASSES, image_size)
    label_csv = root_p / "labels.csv"
    paths, labels, splits, origins = [], [], [], None
    if label_csv.is_file():
        image_path = path_column(label_csv, root_p, root_p, allow_outside_root)
        rows = read_csv(label_csv, ["path", "dx", "split"])
        for line, row in rows:
            paths.append(image_path(line, row["path"]))
            labels.append(class_index(label_csv, line, "dx", row["dx"], HAM_CLASSES))
            splits.append(split_value(label_csv, line, row["split"]))
        origins = [f"{label_csv}, line {line}" for line, _ in rows]
    else:
        for split in SPLIT_NAMES:
            split_dir = root_p / split
            if not split_dir.is_dir():
                continue
            for class_dir in sorted(d for d in split_dir.iterdir() if d.is_dir()):
                if class_dir.name not in HAM_CLASSES:
                    raise DataError(f"{class_dir}: unknown class directory; expected one of {HAM_CLASSES}")
                for p in sorted(class_dir.iterdir()):
                    if is_image(p):
                        paths.append(str(p))
                        labels.append(HAM_CLASSES.index(class_dir.name))
                        splits.append(split)
        if not paths:
            raise DataError(f"{root}: no labels.csv and no images under {root}/<train|val|test>/<class>/")
    return build_dataset(paths, labels, HAM_CLASSES, image_size=image_size, on_bad_image=on_bad_image,
                         num_threads=num_threads, official_split=splits, require_all_classes=True,
                         origins=origins, source=str(label_csv if label_csv.is_file() else root))
