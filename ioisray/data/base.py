"""In-memory dataset container, and reading and decoding the image files (regular files only)."""
from __future__ import annotations

import hashlib
import io
import os
import re
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

from .duplicates import merge_duplicates
from .errors import DataError

ON_BAD_IMAGE = ("error", "skip")
SPLIT_NAMES = ("train", "val", "test")


@dataclass
class ImageDataset:
    images: np.ndarray  # uint8, (N, H, W, 3), RGB
    labels: np.ndarray  # int64, (N,), values in [0, len(class_names))
    class_names: list[str]
    sources: list[str]  # file path per row (or "sklearn-digits[i]")
    groups: np.ndarray | None = None  # (N,) str; rows sharing a group stay in one split
    official_split: np.ndarray | None = None  # (N,) str in {"train","val","test"}
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source, reason)
    duplicates: int = 0  # images listed more than once (same file or same bytes), each kept in one group
    # Per row, the first row listing the same image with the same label (itself if none; None: no image
    # is listed twice): splits count each image once (see distinct_rows).
    first_copy: np.ndarray | None = None
    relabelled: int = 0  # images listed under two labels or more: each of their rows is kept

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.num_classes).astype(np.int64)

    def subset(self, idx: np.ndarray) -> "ImageDataset":
        idx = np.asarray(idx, dtype=np.int64)
        first_copy = None
        if self.first_copy is not None:  # renumbered: the first of each image's rows within idx
            _, first, inverse = np.unique(self.first_copy[idx], return_index=True, return_inverse=True)
            first_copy = first[inverse.reshape(-1)].astype(np.int64)
        return ImageDataset(
            images=self.images[idx],
            labels=self.labels[idx],
            class_names=list(self.class_names),
            sources=[self.sources[i] for i in idx],
            groups=None if self.groups is None else self.groups[idx],
            official_split=None if self.official_split is None else self.official_split[idx],
            skipped=list(self.skipped),
            duplicates=self.duplicates,
            first_copy=first_copy,
            relabelled=self.relabelled,
        )

    def distinct_rows(self, rows: np.ndarray | None = None) -> np.ndarray:
        """`rows` (default: all), in order, without those that repeat an earlier one of them (the same
        image with the same label): each image is trained on, and evaluated, once."""
        rows = np.arange(len(self.labels)) if rows is None else np.asarray(rows, dtype=np.int64)
        if self.first_copy is None:
            return rows
        first = np.unique(self.first_copy[rows], return_index=True)[1]
        return rows[np.sort(first)]

    @property
    def merged_rows(self) -> int:
        """Rows that repeat another (the same image with the same label), merged into it."""
        return 0 if self.first_copy is None else int(len(self.labels) - len(np.unique(self.first_copy)))


def check_on_bad_image(on_bad_image: str) -> None:
    if on_bad_image not in ON_BAD_IMAGE:
        raise DataError(f"option on_bad_image must be one of {ON_BAD_IMAGE}, got {on_bad_image!r}")


def check_image_size(image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise DataError(f"option image_size must be a positive integer, got {image_size!r}")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        # Wide integer/float greyscale: convert("RGB") would clip at 255, so rescale.
        # 16-bit data maps 0..65535 -> 0..255; values already <= 255 are kept as they are.
        arr = np.asarray(img, dtype=np.float64)
        top = arr.max(initial=0.0)
        if img.mode.startswith("I;16") or 255 < top <= 65535:
            arr = arr / 257.0
        elif top > 65535:
            arr = arr * (255.0 / top)
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels have arbitrary colour underneath: composite onto black
        # so they look the same in every image.
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    return img.convert("RGB")


class NotARegularFile(OSError):
    """A path that is a FIFO, device, socket or folder: nothing to decode, and perhaps no end to read."""


def _file_kind(mode: int) -> str:
    kinds = [(stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")]
    return next((kind for test, kind in kinds if test(mode)), "not a file")


def read_file_bytes(path: str) -> bytes:
    """The bytes of `path`, which must be a regular file (NotARegularFile otherwise).

    Opening a FIFO for reading waits for a writer, forever for a loader, and a device may never
    end; so the kind is checked before opening, and again on the opened descriptor (the path may
    have changed in between). O_NONBLOCK only makes opening a FIFO return at once; reads from a
    regular file do not block either way.
    """
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise NotARegularFile(f"not a regular file ({_file_kind(mode)})")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotARegularFile(f"not a regular file ({_file_kind(mode)})")
        with open(fd, "rb", closefd=False) as fh:
            return fh.read()
    finally:
        os.close(fd)


def decode_image_bytes(data: bytes, image_size: int) -> np.ndarray:
    """Decode an image file's bytes to a uint8 (image_size, image_size, 3) RGB array.

    The image is resized straight to a square with BICUBIC: the aspect ratio is NOT kept
    (no crop, no padding), so non-square images are stretched.
    """
    with Image.open(io.BytesIO(data)) as img:
        img.load()  # force full decode so truncated files fail here, not later
        img = ImageOps.exif_transpose(img)  # honour camera orientation tags
        rgb = to_rgb(img)
    if rgb.size != (image_size, image_size):
        rgb = rgb.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return np.asarray(rgb, dtype=np.uint8)


def decode_error(exc: Exception) -> str:
    """PIL's message without the in-memory buffer it names (`<_io.BytesIO object at 0x...>`): the
    message's reader knows the file, and the buffer's address means nothing to them."""
    return re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(exc)).strip() or type(exc).__name__


def decode_image(path: str, image_size: int) -> np.ndarray:
    """Decode the regular file `path` as decode_image_bytes does."""
    return decode_image_bytes(read_file_bytes(path), image_size)


def build_dataset(
    paths: Sequence[str],
    labels: Sequence[int],
    class_names: list[str],
    *,
    image_size: int,
    on_bad_image: str = "error",
    num_threads: int = 4,
    groups: Sequence[str] | None = None,
    official_split: Sequence[str] | None = None,
    require_all_classes: bool = False,
    origins: Sequence[str] | None = None,
    source: str | None = None,
) -> ImageDataset:
    """Decode `paths` in a thread pool (row order kept) and assemble an ImageDataset.

    Unreadable images raise DataError (on_bad_image="error") or are dropped and listed in
    `skipped` (on_bad_image="skip"). Rows that are one image (same resolved path, or same SHA-1
    of the file's bytes) get one group (see duplicates.merge_duplicates); `origins` says where
    each row comes from (e.g. "labels.csv, line 3") and `source` what listed the rows (a CSV, a
    folder), for its error messages.
    """
    check_on_bad_image(on_bad_image)
    check_image_size(image_size)
    paths = [str(p) for p in paths]
    if not paths:
        raise DataError(f"{source or 'the dataset'}: no images listed (no rows or image files found)")
    # Preallocate one array and decode into its rows: avoids a second full-size copy from np.stack.
    images = np.empty((len(paths), image_size, image_size, 3), dtype=np.uint8)
    real_paths, digests = [""] * len(paths), [""] * len(paths)

    def work(i: int) -> str | None:
        try:
            data = read_file_bytes(paths[i])
            images[i] = decode_image_bytes(data, image_size)
            # Hashed here, from the bytes already read, to tell copies of one image apart from others.
            digests[i] = hashlib.sha1(data).hexdigest()
            real_paths[i] = os.path.realpath(paths[i])
            return None
        except FileNotFoundError:
            return "file not found"
        except NotARegularFile as exc:
            return str(exc)
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
            return f"cannot decode image ({type(exc).__name__}: {decode_error(exc)})"

    with ThreadPoolExecutor(max(1, int(num_threads))) as pool:
        errors = list(pool.map(work, range(len(paths))))  # map() keeps row order

    skipped = [(p, e) for p, e in zip(paths, errors) if e is not None]
    if skipped and on_bad_image == "error":
        path, reason = skipped[0]
        more = f" (and {len(skipped) - 1} more bad images)" if len(skipped) > 1 else ""
        raise DataError(f"{path}: {reason}{more}; set data.on_bad_image=skip to drop bad images")
    keep = np.array([e is None for e in errors])
    if not keep.any():
        raise DataError(f"all {len(paths)} images are unreadable, e.g. {skipped[0][0]}: {skipped[0][1]}")

    kept = np.flatnonzero(keep)
    sources = [paths[i] for i in kept]
    split = None if official_split is None else np.asarray(official_split, dtype=str)[keep]
    labels = np.asarray(labels, dtype=np.int64)[keep]
    found = merge_duplicates(
        sources, [real_paths[i] for i in kept], [digests[i] for i in kept],
        None if groups is None else np.asarray(groups, dtype=str)[keep], split,
        None if origins is None else [origins[i] for i in kept], labels)
    ds = ImageDataset(
        images=images[keep] if not keep.all() else images,
        labels=labels,
        class_names=list(class_names),
        sources=sources,
        groups=found.groups,
        official_split=split,
        skipped=skipped,
        duplicates=found.images,
        first_copy=found.first,
        relabelled=found.relabelled,
    )
    if require_all_classes:
        empty = [c for c, n in zip(ds.class_names, ds.class_counts()) if n == 0]
        if empty:
            raise DataError(f"{source or 'the dataset'}: class(es) {empty} have no images (checked after skipping "
                            f"bad images)")
    return ds
