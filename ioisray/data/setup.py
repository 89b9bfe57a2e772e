"""The dataset and split of a run's config: every recipe loads its data through `setup_data`, so the
classifier, its diffusion model and its evaluation all see the same split."""
from __future__ import annotations

import time
from typing import Optional

import numpy as np

from ioisray.config import Config
from ioisray.data.base import ImageDataset
from ioisray.data.loaders import load_dataset
from ioisray.data.splits import split_dataset


def setup_data(cfg: Config, image_size: Optional[int] = None) -> tuple[ImageDataset, dict[str, np.ndarray]]:
    """Load the dataset and split it by `cfg.split_seed`: every recipe sees the same split."""
    d = cfg.data
    t0 = time.perf_counter()
    ds = load_dataset(d.name, d.root, image_size=image_size or d.image_size, csv=d.csv,
                      on_bad_image=d.on_bad_image, imbalance_ratio=d.imbalance_ratio, seed=cfg.split_seed,
                      num_threads=d.num_threads, allow_outside_root=d.allow_outside_root)
    splits = split_dataset(ds, val_fraction=d.val_fraction, test_fraction=d.test_fraction, seed=cfg.split_seed)
    counts = ds.subset(splits["train"]).class_counts()
    if (counts == 0).any():
        empty = [ds.class_names[i] for i in np.flatnonzero(counts == 0)]
        raise ValueError(f"the training split has no image of class(es) {empty}")
    sizes = {k: len(v) for k, v in splits.items()}
    print(f"[ioisray] data {d.name}: {len(ds.labels) - ds.merged_rows} images, {ds.num_classes} classes, "
          f"splits {sizes}, train per class {dict(zip(ds.class_names, counts.tolist()))}"
          + (f", skipped {len(ds.skipped)} bad images" if ds.skipped else "")
          + (f", {ds.duplicates} images listed twice or more (each kept in one split; {ds.merged_rows} repeated "
             f"rows merged, each image counted once)" if ds.duplicates else "")
          + (f", {ds.relabelled} of them listed under different labels (a row for each label kept)"
             if ds.relabelled else "")
          + f" ({time.perf_counter() - t0:.1f}s)", flush=True)
    for src, why in ds.skipped:
        print(f"[ioisray] skipped {src}: {why}", flush=True)
    return ds, splits
