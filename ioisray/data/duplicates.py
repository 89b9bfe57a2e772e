"""One image listed twice (the same file under two paths, or the same bytes under two names) is one
split group, so that no copy of a validation or test image is trained on."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import DataError


class _Components:
    """Union-find over rows; a component's root is its smallest row, so labels follow row order."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]  # path halving
            i = self.parent[i]
        return i

    def join_equal(self, keys: Sequence) -> None:
        """Join every row to the first row with the same key."""
        first: dict = {}
        for i, key in enumerate(keys):
            a, b = self.find(i), self.find(first.setdefault(key, i))
            self.parent[max(a, b)] = min(a, b)


@dataclass(frozen=True)
class Duplicates:
    """What merge_duplicates found. `groups`: the rows' split groups with copies of one image joined;
    `images`: images listed more than once; `first`: per row, the first row listing the same image with
    the same label (the row itself when there is none; None when no image is listed twice), so that
    each is counted once; `relabelled`: images listed under two labels or more (every row kept)."""

    groups: np.ndarray | None
    images: int = 0
    first: np.ndarray | None = None
    relabelled: int = 0


def merge_duplicates(sources: Sequence[str], real_paths: Sequence[str], digests: Sequence[str],
                     groups: np.ndarray | None, official_split: np.ndarray | None,
                     origins: Sequence[str] | None = None, labels: Sequence[int] | None = None) -> Duplicates:
    """The rows' split groups with duplicates joined, and which rows repeat another (see Duplicates).

    Rows with the same resolved path or the same content digest are one image. Each set of them,
    together with every row sharing a group with one of them, becomes one group, labelled by the
    group (else the source) of its first row; with no duplicates `groups` comes back as it is.
    Copies in different official splits are a DataError naming both rows (`origins`, e.g. a CSV
    line, where known): the official split would put one image on both sides.
    """
    components = _Components(len(sources))
    components.join_equal(real_paths)
    components.join_equal(digests)
    roots = [components.find(i) for i in range(len(sources))]
    duplicated = {root for i, root in enumerate(roots) if root != i}  # first rows of images listed again
    if not duplicated:
        return Duplicates(groups)
    if official_split is not None:
        _check_one_official_split(roots, sources, real_paths, digests, official_split, origins)
    labels = [0] * len(sources) if labels is None else [int(x) for x in labels]
    first: dict = {}
    first_row = np.asarray([first.setdefault((root, label), i) for i, (root, label) in enumerate(zip(roots, labels))],
                           dtype=np.int64)
    labels_of: dict = {}
    for root, label in first:
        labels_of.setdefault(root, set()).add(label)
    relabelled = sum(len(ls) > 1 for ls in labels_of.values())
    if groups is not None:
        components.join_equal(groups.tolist())
    names = sources if groups is None else groups.tolist()
    merged = np.asarray([names[components.find(i)] for i in range(len(sources))], dtype=str)
    return Duplicates(merged, len(duplicated), first_row, relabelled)


def _check_one_official_split(roots, sources, real_paths, digests, official_split, origins) -> None:
    def row(j: int) -> str:
        return f"{origins[j]} ({sources[j]})" if origins is not None else sources[j]

    for i, first in enumerate(roots):
        if official_split[i] != official_split[first]:
            how = ("the same file" if real_paths[i] == real_paths[first] else
                   "byte-identical files" if digests[i] == digests[first] else "copies of one image")
            raise DataError(f"{row(first)} and {row(i)} are {how} but sit in official splits "
                            f"{str(official_split[first])!r} and {str(official_split[i])!r}: one image may be in "
                            f"one split only; remove the extra row or put both in the same split")
