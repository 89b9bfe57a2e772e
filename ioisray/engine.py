"""One training epoch and one prediction pass over an iterable of batches (plain PyTorch, no Ray).

A batch is a dict {"image": uint8 (B, H, W, 3), "label": int64 (B,)}: what Ray Data's
`iter_torch_batches` yields, and what a plain list of tensors gives in tests and benchmarks. IOIS
batches also carry "synthetic" (1 for a generated image), which training treats like any other row,
unless `synthetic_weight` < 1 weights its loss down.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import numpy as np
import torch

from ioisray.distributed import all_reduce_sum
from ioisray.mixup import mixup_batch, mixup_loss
from ioisray.precision import autocast, grad_scaler
from ioisray.transforms import eval_transform


@dataclass
class EpochStats:
    loss: float
    correct: np.ndarray  # (C,) per-class correct predictions on the training images seen
    total: np.ndarray  # (C,) per-class training images seen
    seconds: float

    @property
    def per_class_accuracy(self) -> np.ndarray:
        """Training accuracy per class, NaN for a class with no image this epoch (AAS decides then)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.total > 0, self.correct / np.maximum(self.total, 1), np.nan)

    @property
    def accuracy(self) -> float:
        return float(self.correct.sum() / max(self.total.sum(), 1))


def train_one_epoch(model: torch.nn.Module, batches: Iterable[dict], loss_fn: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, transform: Callable, num_classes: int,
                    device: torch.device, *, mixup_alpha: float = 0.0,
                    generator: Optional[torch.Generator] = None, max_batches: Optional[int] = None,
                    log: Optional[Callable[[int, torch.Tensor], None]] = None, precision: str = "fp32",
                    scaler: Optional[torch.amp.GradScaler] = None, channels_last: bool = False,
                    synthetic_weight: float = 1.0) -> EpochStats:
    """Train one pass; per-class training accuracy is summed over all workers.

    The accuracy counts real images only (rows whose "synthetic" flag is 0, or all rows without the
    column): it feeds AAS, which asks how well the classifier does on the real training split.
    With mixup a prediction counts as correct for the label with the larger mixing weight.

    Batches may live on the CPU (pinned, ideally): images and labels move to `device` without
    blocking, augmentation runs there, and nothing waits for the device until the epoch's counts
    are reduced, except what `log` asks for (it gets the loss as a tensor; `.item()` syncs).
    `precision` is "bf16", "fp16" (with `scaler`) or "fp32" (see ioisray/precision.py).
    A batch of a single image is skipped: BatchNorm cannot train on it (it is at most one image an
    epoch, the last one of an uneven split) and the epoch's count does not include it.
    `synthetic_weight` (synthesis.loss_weight) is a synthetic row's weight in the batch's loss, a real
    row's being 1: the loss is then the weighted mean (losses.py); 1 computes the loss as without it.
    """
    model.train()
    scaler = scaler or grad_scaler(device, precision)
    start = time.perf_counter()
    correct = torch.zeros(num_classes, dtype=torch.float64, device=device)
    total = torch.zeros(num_classes, dtype=torch.float64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    rows = torch.zeros((), dtype=torch.float64, device=device)
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        if len(batch["label"]) < 2:
            continue
        x = transform(batch["image"].to(device, non_blocking=True))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = batch["label"].to(device, dtype=torch.long, non_blocking=True)
        # Weights, not a boolean mask: masking needs the count of selected rows, a host sync.
        real = ((batch["synthetic"] == 0).to(device, non_blocking=True).long() if "synthetic" in batch
                else torch.ones_like(y))
        weighted = synthetic_weight != 1.0 and "synthetic" in batch
        with autocast(device, precision):
            if mixup_alpha > 0:
                # Label and real flag go through the permutation together: a mixed row counts for the
                # image whose weight dominates, and only when that image is real.
                x, counted_a, counted_b, lam = mixup_batch(x, torch.stack([y, real], 1), mixup_alpha,
                                                           generator=generator)
                logits = model(x)
                if weighted:  # each target's loss weighted by its own image's weight
                    loss = mixup_loss(loss_fn, logits, counted_a[:, 0], counted_b[:, 0], lam,
                                      _row_weights(counted_a[:, 1], synthetic_weight),
                                      _row_weights(counted_b[:, 1], synthetic_weight))
                else:
                    loss = mixup_loss(loss_fn, logits, counted_a[:, 0], counted_b[:, 0], lam)
                y_counted, real_counted = (counted_a if lam >= 0.5 else counted_b).unbind(1)
            else:
                logits = model(x)
                loss = loss_fn(logits, y, _row_weights(real, synthetic_weight)) if weighted else loss_fn(logits, y)
                y_counted, real_counted = y, real
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        with torch.no_grad():
            hit = (logits.argmax(dim=1) == y_counted).double()
            correct.index_add_(0, y_counted, hit * real_counted)
            total.index_add_(0, y_counted, real_counted.double())
            loss_sum += loss.detach().double() * len(y)
            rows += len(y)
        if log is not None:
            log(i + 1, loss.detach())
    stats = all_reduce_sum(torch.cat([correct, total, loss_sum.view(1), rows.view(1)])).cpu().numpy()
    n = stats[num_classes:2 * num_classes]
    return EpochStats(loss=float(stats[-2] / max(stats[-1], 1)), correct=stats[:num_classes].astype(np.int64),
                      total=n.astype(np.int64), seconds=time.perf_counter() - start)


def _row_weights(real: torch.Tensor, synthetic_weight: float) -> torch.Tensor:
    """1 for a real row, `synthetic_weight` for a synthetic one (float, on the rows' device)."""
    return torch.where(real.bool(), 1.0, synthetic_weight).float()


@torch.no_grad()
def predict(model: torch.nn.Module, batches: Iterable[dict], device: torch.device,
            transform: Callable = eval_transform) -> tuple[np.ndarray, np.ndarray]:
    """Labels and softmax probabilities of every image, none dropped, deterministic transform, in
    float32 whatever the training precision, so that `ioisray evaluate` of a run's weights on the
    same kind of device reproduces the run's own validation and test figures exactly."""
    model.eval()
    labels, probs = [], []
    for batch in batches:
        logits = model(transform(batch["image"].to(device, non_blocking=True)))
        probs.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
        labels.append(batch["label"].cpu().numpy())
    if not labels:
        raise ValueError("predict: no images to evaluate")
    return np.concatenate(labels).astype(np.int64), np.concatenate(probs)


def numpy_batches(images: np.ndarray, labels: np.ndarray, batch_size: int,
                  shuffle_seed: Optional[int] = None) -> Iterable[dict]:
    """Batches from in-memory arrays, the Ray-free counterpart of `iter_torch_batches`."""
    order = np.arange(len(labels))
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(order)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        yield {"image": torch.from_numpy(images[idx]), "label": torch.from_numpy(labels[idx])}
