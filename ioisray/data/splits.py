"""Train/val/test splitting: stratified by label, grouped (no leakage), or the official split."""
from __future__ import annotations

import math

import numpy as np

from .base import SPLIT_NAMES, DataError, ImageDataset


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise DataError(f"option {name} must be a finite number, got {value!r}")
    if val_fraction < 0:
        raise DataError(f"option val_fraction must be >= 0, got {val_fraction}")
    if test_fraction <= 0:
        raise DataError(f"option test_fraction must be > 0, got {test_fraction}")
    if val_fraction + test_fraction >= 1:
        raise DataError(f"options val_fraction + test_fraction must be < 1, got "
                        f"{val_fraction} + {test_fraction}")


def _allocate(labels: np.ndarray, group_ids: np.ndarray, fractions: dict[str, float],
              num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Give each row a split name; whole groups move together, the rest goes to "train".

    Why hand-written rather than scikit-learn: train_test_split stratifies but cannot keep
    groups together, GroupShuffleSplit groups but does not stratify, and StratifiedGroupKFold
    only yields 1/k-sized folds, not arbitrary fractions. So: each group is filed under its
    most common label; per class the groups are shuffled and laid end to end, and a group goes
    to the split its midpoint falls in (cumulative image fractions, test first, then val).
    Classes with at least one group per split then get at least one group in every split.
    """
    n_groups = int(group_ids.max()) + 1
    per_group = np.zeros((n_groups, num_classes), dtype=np.int64)
    np.add.at(per_group, (group_ids, labels), 1)
    sizes, dominant = per_group.sum(1), per_group.argmax(1)
    names = list(fractions) + ["train"]
    bounds = np.cumsum([fractions[n] for n in fractions])  # upper fraction bound of each named split
    wanted = [n for n in names if n == "train" or fractions[n] > 0]
    group_split = np.empty(n_groups, dtype=object)
    for c in range(num_classes):
        gs = rng.permutation(np.flatnonzero((dominant == c) & (sizes > 0)))
        if gs.size == 0:
            continue
        mid = (np.cumsum(sizes[gs]) - sizes[gs] / 2) / sizes[gs].sum()
        assign = [names[int(np.searchsorted(bounds, m, side="right"))] for m in mid]
        if gs.size >= len(wanted):
            # Tiny classes: the midpoint rule can leave a split empty; move in the smallest
            # group from the split that has the most groups.
            for target in wanted:
                if target not in assign:
                    donor = max(wanted, key=assign.count)
                    cands = [i for i, a in enumerate(assign) if a == donor]
                    assign[min(cands, key=lambda i: sizes[gs[i]])] = target
        group_split[gs] = assign
    return group_split[group_ids]


def split_dataset(ds: ImageDataset, *, val_fraction: float, test_fraction: float,
                  seed: int) -> dict[str, np.ndarray]:
    """Return {"train","val","test"} -> sorted, disjoint int64 row indices covering every image once.

    Uses `ds.official_split` when set (carving val_fraction of its train rows into val if it
    has no val rows, and likewise test_fraction if it has no test rows); otherwise a
    stratified split that keeps each `ds.groups` value in a single split. The rows are split first,
    copies of an image together (one group), then a row that repeats another (the same image with the
    same label, ds.first_copy) is left out, so that each image is trained on or evaluated once and
    every other image keeps the split it had.
    """
    _check_fractions(val_fraction, test_fraction)
    n = len(ds.labels)
    rng = np.random.default_rng(seed)
    # Dense integer group ids; without groups every row is its own group.
    if ds.groups is None:
        group_ids = np.arange(n)
    else:
        group_ids = np.unique(np.asarray(ds.groups, dtype=str), return_inverse=True)[1].reshape(-1)
    if ds.official_split is not None:
        split = np.asarray(ds.official_split, dtype=object).copy()
        bad = sorted({str(s) for s in split} - set(SPLIT_NAMES))
        if bad:
            raise DataError(f"official_split holds values {bad}; expected {list(SPLIT_NAMES)}")
        for name, frac in (("test", test_fraction), ("val", val_fraction)):
            train = np.flatnonzero(split == "train")
            if not (split == name).any() and frac > 0 and train.size:
                # Re-number the train rows' groups densely for _allocate.
                gids = np.unique(group_ids[train], return_inverse=True)[1].reshape(-1)
                split[train] = _allocate(ds.labels[train], gids, {name: frac}, ds.num_classes, rng)
    else:
        split = _allocate(ds.labels, group_ids, {"test": test_fraction, "val": val_fraction},
                          ds.num_classes, rng) if n else np.empty(0, dtype=object)
    return {name: ds.distinct_rows(np.flatnonzero(split == name).astype(np.int64)) for name in SPLIT_NAMES}
