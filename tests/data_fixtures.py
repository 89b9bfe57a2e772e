"""Writers for tiny on-disk datasets in each layout ioisray.data reads.

Every `make_*` function writes into `root` (a pathlib.Path, e.g. pytest's tmp_path) and returns
a dict with what a test needs to check. Images are 12x9 solid colours, so a class's colour
survives loading (exactly for PNG/BMP, within a few levels for JPEG).
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

HAM_CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
APTOS_CLASSES = ["0_No_DR", "1_Mild", "2_Moderate", "3_Severe", "4_Proliferate_DR"]
SIZE = (12, 9)  # width x height: deliberately not square


def class_color(c: int) -> tuple[int, int, int]:
    return (20 + 30 * c, 200 - 25 * c, 90 + 10 * c)


def _name_in_metadata(path: Path) -> dict:
    """Save options that write the file's path into its metadata (PNG text, JPEG comment, TIFF
    description), pixels untouched. Solid-colour images of one class would otherwise be
    byte-identical files, which the loaders rightly take for one image listed twice."""
    suffix = path.suffix.lower()
    if suffix == ".png":
        info = PngInfo()
        info.add_text("fixture", str(path))
        return {"pnginfo": info}
    if suffix in (".jpg", ".jpeg"):
        return {"comment": str(path).encode()}
    if suffix in (".tif", ".tiff"):
        return {"description": str(path)}
    return {}  # BMP and others: write at most one per colour per dataset


def write_image(path: Path, color=(128, 64, 32), mode: str = "RGB", size=SIZE) -> Path:
    """Write a solid-colour image; the format follows the suffix. mode "I;16" writes 16-bit white.
    Files at different paths differ in their bytes (see _name_in_metadata)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        img = Image.fromarray(np.full((size[1], size[0]), 65535, dtype=np.uint16))
    elif mode == "P":
        img = Image.new("P", size, 1)
        img.putpalette([0, 0, 0, *color] + [0] * (3 * 254))  # index 1 holds the exact colour
    else:
        img = Image.new("RGB", size, color).convert(mode)
    img.save(path, **_name_in_metadata(path))
    return path


def write_corrupt(path: Path) -> Path:
    """Overwrite/create `path` with bytes no image decoder accepts."""
    Path(path).write_bytes(b"not an image at all " * 20)
    return Path(path)


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def _ham_rows(classes, lesions_per_class, images_per_lesion):
    """(image_id, lesion_id, dx, class index) for each image; lesions hold several images."""
    rows, n = [], 0
    for dx in classes:
        c = HAM_CLASSES.index(dx)
        for lesion in range(lesions_per_class):
            for _ in range(images_per_lesion):
                rows.append((f"ISIC_{n:07d}", f"HAM_{c}{lesion:06d}", dx, c))
                n += 1
    return rows


def _ham_result(rows, csv_path, paths):
    counts = np.bincount([r[3] for r in rows], minlength=len(HAM_CLASSES))
    return {"csv": csv_path, "n": len(rows), "class_counts": counts,
            "labels": [r[3] for r in rows], "lesions": [r[1] for r in rows], "paths": paths}


def make_ham10000_official(root: Path, lesions_per_class: int = 2, images_per_lesion: int = 2,
                           classes=HAM_CLASSES) -> dict:
    """HAM10000_metadata.csv + <image_id>.jpg split over two part folders (some greyscale)."""
    rows = _ham_rows(classes, lesions_per_class, images_per_lesion)
    paths = []
    for i, (image_id, _, _, c) in enumerate(rows):
        part = "HAM10000_images_part_1" if i % 2 == 0 else "HAM10000_images_part_2"
        paths.append(write_image(root / part / f"{image_id}.jpg", class_color(c), "L" if i % 3 == 0 else "RGB"))
    csv_path = write_csv(root / "HAM10000_metadata.csv",
                         ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"],
                         [[les, iid, dx, "histo", 50.0, "male", "back"] for iid, les, dx, _ in rows])
    return _ham_result(rows, csv_path, paths)


def make_ham10000_copy(root: Path, lesions_per_class: int = 2, images_per_lesion: int = 2,
                       classes=HAM_CLASSES) -> dict:
    """labels.csv (path, image_id, lesion_id, dx, ...) + <dx>/<image_id>.jpg (some CMYK)."""
    rows = _ham_rows(classes, lesions_per_class, images_per_lesion)
    paths = [write_image(root / dx / f"{iid}.jpg", class_color(c), "CMYK" if i % 4 == 1 else "RGB")
             for i, (iid, _, dx, c) in enumerate(rows)]
    csv_path = write_csv(root / "labels.csv",
                         ["path", "image_id", "lesion_id", "dx", "dx_type", "age", "sex", "localization"],
                         [[f"{dx}/{iid}.jpg", iid, les, dx, "histo", 50.0, "male", "back"]
                          for iid, les, dx, _ in rows])
    return _ham_result(rows, csv_path, paths)


def make_aptos_official(root: Path, per_class=(3, 2, 2, 1, 1)) -> dict:
    """train.csv (id_code, diagnosis) + train_images/<id_code>.png."""
    rows = [(f"{c:02x}{i:010x}", c) for c, n in enumerate(per_class) for i in range(n)]
    paths = [write_image(root / "train_images" / f"{code}.png", class_color(c)) for code, c in rows]
    csv_path = write_csv(root / "train.csv", ["id_code", "diagnosis"], [list(r) for r in rows])
    return {"csv": csv_path, "n": len(rows), "class_counts": np.array(per_class),
            "labels": [c for _, c in rows], "paths": paths}


def make_aptos_copy(root: Path, per_class=(3, 2, 2, 1, 1)) -> dict:
    """labels.csv (path, id_code, diagnosis, class_folder) + <grade folder>/<id_code>.jpg."""
    rows = [(f"{c:02x}{i:010x}", c) for c, n in enumerate(per_class) for i in range(n)]
    paths = [write_image(root / APTOS_CLASSES[c] / f"{code}.jpg", class_color(c)) for code, c in rows]
    csv_path = write_csv(root / "labels.csv", ["path", "id_code", "diagnosis", "class_folder"],
                         [[f"{APTOS_CLASSES[c]}/{code}.jpg", code, c, APTOS_CLASSES[c]] for code, c in rows])
    return {"csv": csv_path, "n": len(rows), "class_counts": np.array(per_class),
            "labels": [c for _, c in rows], "paths": paths}


def make_dermamnist(root: Path, per_split=(("train", 2), ("val", 1), ("test", 1)),
                    labels_csv: bool = True) -> dict:
    """<split>/<dx>/DermaMNIST_<split>_<n>.jpg for every class, plus labels.csv (path, image_id,
    dx, split) when labels_csv is True."""
    rows = []
    for split, n in per_split:
        k = 0
        for c, dx in enumerate(HAM_CLASSES):
            for _ in range(n):
                image_id = f"DermaMNIST_{split}_{k:05d}"
                write_image(root / split / dx / f"{image_id}.jpg", class_color(c), size=(28, 28))
                rows.append([f"{split}/{dx}/{image_id}.jpg", image_id, dx, split])
                k += 1
    if labels_csv:
        write_csv(root / "labels.csv", ["path", "image_id", "dx", "split"], rows)
    return {"n": len(rows), "split_counts": {s: n * len(HAM_CLASSES) for s, n in per_split},
            "class_counts": np.full(len(HAM_CLASSES), sum(n for _, n in per_split)),
            "csv": root / "labels.csv" if labels_csv else None}


def make_imagefolder(root: Path) -> dict:
    """root/<class>/ with mixed formats and modes (RGB/RGBA/palette PNG, greyscale and upper-case
    JPEG, BMP, TIFF, 16-bit PNG in a nested folder) and a non-image file that must be ignored."""
    spec = {
        "benign": [("a.png", "RGB"), ("b.png", "RGBA"), ("c.jpg", "L")],
        "malignant": [("a.png", "P"), ("b.bmp", "RGB"), ("nested/c.png", "I;16"), ("d.JPEG", "RGB")],
        "normal": [("a.tif", "RGB"), ("b.png", "RGB")],
    }
    names = sorted(spec)
    for c, name in enumerate(names):
        for fname, mode in spec[name]:
            write_image(root / name / fname, class_color(c), mode)
    (root / "benign" / "notes.txt").write_text("not an image")
    return {"class_names": names, "class_counts": np.array([len(spec[n]) for n in names]),
            "n": sum(len(v) for v in spec.values())}


def make_csv(root: Path, with_group: bool = True, with_split: bool = True) -> dict:
    """root/meta/labels.csv (path, label[, group, split]) with paths relative to root/meta and
    integer labels "0", "2", "10" (numeric order differs from text order). One path is absolute."""
    labels = ["10", "0", "2", "2", "0", "10", "0", "2", "10"]
    splits = ["train", "train", "train", "val", "val", "test", "test", "train", "train"]
    header = ["path", "label"] + (["group"] if with_group else []) + (["split"] if with_split else [])
    rows = []
    for i, lab in enumerate(labels):
        c = ["0", "2", "10"].index(lab)
        path = write_image(root / "meta" / "imgs" / f"img{i}.png", class_color(c))
        row = [str(path) if i == 0 else f"imgs/img{i}.png", lab]
        row += [f"patient{i // 2}"] if with_group else []
        row += [splits[i]] if with_split else []
        rows.append(row)
    csv_path = write_csv(root / "meta" / "labels.csv", header, rows)
    return {"csv": csv_path, "n": len(labels), "class_names": ["0", "2", "10"],
            "labels": [["0", "2", "10"].index(x) for x in labels],
            "groups": [f"patient{i // 2}" for i in range(len(labels))], "splits": splits}
