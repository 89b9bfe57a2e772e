"""What a training worker sees of an epoch's synthetic images, and what synthesis.filter dropped before
they were sent (plain PyTorch, no Ray)."""
from __future__ import annotations

import time
from typing import Iterable, Iterator, Optional

import numpy as np
import torch


class SyntheticTally:
    """Wraps an epoch's batches: counts synthetic images per class, times the first one, keeps a few
    per class for the epoch's image grid, and refuses a synthetic image from another epoch's plan.
    """

    def __init__(self, num_classes: int, plan_epoch: int, keep_per_class: int = 0,
                 started_at: Optional[float] = None):
        self.plan_epoch = plan_epoch
        self.per_class = np.zeros(num_classes, dtype=np.int64)
        self.started_at = started_at if started_at is not None else time.time()
        self.first_at: Optional[float] = None  # wall-clock time of the first synthetic batch
        self.first_batch_at: Optional[float] = None  # and of the epoch's first batch of any kind
        self.keep_per_class = keep_per_class
        self.kept: list[list[torch.Tensor]] = [[] for _ in range(num_classes)]

    def watch(self, batches: Iterable[dict]) -> Iterator[dict]:
        for batch in batches:
            if self.first_batch_at is None:
                self.first_batch_at = time.time()
            if "synthetic" in batch:
                self._see(batch)
            yield batch

    def _see(self, batch: dict) -> None:
        synthetic = (batch["synthetic"] != 0).cpu()
        if not synthetic.any():
            return
        if self.first_at is None:
            self.first_at = time.time()
        epochs = batch["plan_epoch"].cpu()[synthetic]
        if (epochs != self.plan_epoch).any():
            raise RuntimeError(f"a synthetic image of plan epoch {int(epochs[epochs != self.plan_epoch][0])} "
                               f"reached training while plan {self.plan_epoch} was current")
        labels = batch["label"].cpu()[synthetic]
        self.per_class += np.bincount(labels.numpy(), minlength=len(self.per_class))
        if self.keep_per_class:
            images = batch["image"].cpu()[synthetic]
            for c in labels.unique().tolist():
                room = self.keep_per_class - sum(len(t) for t in self.kept[c])
                if room > 0:
                    self.kept[c].append(images[labels == c][:room].clone())

    @property
    def seconds_to_first(self) -> Optional[float]:
        return None if self.first_at is None else self.first_at - self.started_at

    @property
    def seconds_to_first_batch(self) -> Optional[float]:
        return None if self.first_batch_at is None else self.first_batch_at - self.started_at

    def examples(self) -> list[torch.Tensor]:
        """Kept images per class, uint8 (k, H, W, 3) each (k may be 0)."""
        return [torch.cat(t) if t else torch.zeros((0,), dtype=torch.uint8) for t in self.kept]


def filtered_per_class(timings: Iterable[Optional[dict]]) -> Optional[list[int]]:
    """Images synthesis.filter dropped per class, summed over an epoch's finished chunks (the "filtered"
    of each chunk's timing); None when no chunk was filtered (no filter, or no judge yet)."""
    counts = [t["filtered"] for t in timings if t is not None and t.get("filtered") is not None]
    return np.sum(counts, axis=0, dtype=np.int64).tolist() if counts else None
