"""What the loaders share: reading a CSV into numbered rows, checking its cells, finding image files."""
from __future__ import annotations

import codecs
import csv as csvlib
import io
import os
from pathlib import Path
from typing import Callable

from ..base import SPLIT_NAMES, DataError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def read_csv(path: str | Path, required: list[str]) -> list[tuple[int, dict[str, str]]]:
    """Read a CSV into (line number, row) pairs; line numbers count the header as line 1.

    Keys and values are stripped; a missing required column is a DataError.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: " + ("CSV file not found" if not path.exists() else "not a regular file"))
    reader = csvlib.DictReader(io.StringIO(_utf8_text(path), newline=""))
    found = [(name or "").strip() for name in (reader.fieldnames or [])]
    for col in required:
        if col not in found:
            raise DataError(f"{path}: missing column {col!r}; columns found: {found}")
    rows = []
    for raw in reader:
        row = {(k or "").strip(): (v or "").strip() if isinstance(v, str) else "" for k, v in raw.items()}
        rows.append((reader.line_num, row))  # physical line of the row's end
    return rows


def _utf8_text(path: Path) -> str:
    """The CSV's text. Decoded whole rather than streamed, so that a byte that is not UTF-8 can be
    named with its line (a streaming decoder fails on a chunk, and does not say which line)."""
    raw = path.read_bytes()
    # Spreadsheet exports put a BOM before the header: skip it, keeping offsets those of the file.
    start = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[start:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = start + e.start
        line = raw.count(b"\n", 0, offset) + 1
        raise DataError(f"{where(path, line)}: byte 0x{raw[offset]:02x} at offset {offset} is not UTF-8; "
                        f"save the CSV as UTF-8") from None


def where(path: Path, line: int) -> str:
    return f"{path}, line {line} (header is line 1)"


def class_index(path: Path, line: int, field: str, value: str, class_names: list[str]) -> int:
    if value not in class_names:
        raise DataError(f"{where(path, line)}: unknown {field} {value!r}; expected one of {class_names}")
    return class_names.index(value)


def split_value(path: Path, line: int, value: str) -> str:
    if value not in SPLIT_NAMES:
        raise DataError(f"{where(path, line)}: split {value!r} is not one of {list(SPLIT_NAMES)}")
    return value


def path_column(csv_path: Path, base: Path, root: Path, allow_outside: bool) -> Callable[[int, str], str]:
    """A function (line, cell) -> the image path a CSV's `path` cell names: joined to `base` unless
    absolute. A path that resolves outside `root` (through `..`, an absolute path or a symlink) is a
    DataError naming the CSV, line and cell, unless allow_outside: a CSV from elsewhere must not make
    a run read, and train on, files outside the data folder without the user saying so."""
    top = Path(os.path.realpath(root))

    def image_path(line: int, cell: str) -> str:
        path = cell if os.path.isabs(cell) else str(base / cell)
        real = Path(os.path.realpath(path))
        if not allow_outside and not real.is_relative_to(top):
            raise DataError(f"{where(csv_path, line)}: path {cell!r} is outside {root} (it resolves to {real}); "
                            f"set data.allow_outside_root=true to read files outside it")
        return path

    return image_path


def is_image(path: Path) -> bool:
    """Whether a tree entry named like an image is to be read: anything but a folder (or a dangling
    link). Not only regular files: a FIFO or device named like an image is then reported by
    build_dataset as not a regular file, rather than left out without a word."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.exists() and not path.is_dir()
