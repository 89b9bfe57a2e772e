"""Accuracy Adaptive Sampling (AAS): per-class synthesis quotas from per-class training accuracy.

n_c = N * softmax((1 - a_c) / T)_c, so classes the classifier gets wrong get more synthetic images.
Unlike the reference (which floors each product and silently loses images), quotas are rounded with
the largest-remainder (Hamilton) method so they always sum to exactly the budget N.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

# Accuracy assumed for a class that has never been seen (the reference starts every class here).
UNSEEN_ACCURACY = 0.5


def _check_temperature(temperature: float) -> None:
    t = float(temperature)
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"aas.temperature must be a finite number > 0, got {temperature!r}")


def _check_accuracy(accuracy: Sequence[float]) -> np.ndarray:
    a = np.asarray(accuracy, dtype=np.float64)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"accuracy must be a non-empty 1-D sequence, got shape {a.shape}")
    for c, value in enumerate(a):
        if not (0.0 <= value <= 1.0):  # also false for NaN
            raise ValueError(f"accuracy of class {c} must be in [0, 1], got {value!r}")
    return a


def softmax_shares(accuracy: Sequence[float], temperature: float) -> np.ndarray:
    """softmax((1 - a_c) / T) as float64; sums to 1."""
    _check_temperature(temperature)
    a = _check_accuracy(accuracy)
    logits = (1.0 - a) / float(temperature)
    logits -= logits.max()  # stable for tiny T
    e = np.exp(logits)
    return e / e.sum()


def largest_remainder(shares: np.ndarray, total: int) -> np.ndarray:
    """Integer split of `total` proportional to `shares` (summing to 1), summing to exactly `total`.

    Floors first, then hands the leftover units to the largest fractional parts; ties go to the
    lower class index (stable sort), so the result is deterministic.
    """
    exact = shares * total
    counts = np.floor(exact).astype(np.int64)
    leftover = int(total - counts.sum())
    if leftover > 0:
        order = np.argsort(-(exact - counts), kind="stable")
        counts[order[:leftover]] += 1
    return counts


def quotas(
    accuracy: Sequence[float] | None,
    budget: int,
    temperature: float = 1.0,
    *,
    num_classes: int | None = None,
    floor: int = 0,
) -> np.ndarray:
    """Per-class synthesis quotas (int64, shape (C,)) summing to exactly `budget`.

    `accuracy=None` (before the first epoch) gives uniform quotas and then needs `num_classes`.
    Every class gets at least `floor`; the rest of the budget is split by the softmax shares.
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 0:
        raise ValueError(f"synthesis.budget must be an integer >= 0, got {budget!r}")
    _check_temperature(temperature)
    if accuracy is None:
        if num_classes is None or num_classes < 1:
            raise ValueError("quotas() needs num_classes >= 1 when accuracy is None")
        shares = np.full(num_classes, 1.0 / num_classes)
    else:
        shares = softmax_shares(accuracy, temperature)
        if num_classes is not None and num_classes != shares.size:
            raise ValueError(f"accuracy has {shares.size} classes but num_classes={num_classes}")
    n_classes = shares.size
    if isinstance(floor, bool) or not isinstance(floor, (int, np.integer)) or floor < 0:
        raise ValueError(f"aas.floor must be an integer >= 0, got {floor!r}")
    if floor * n_classes > budget:
        raise ValueError(
            f"aas.floor={floor} times {n_classes} classes exceeds synthesis.budget={budget}")
    return floor + largest_remainder(shares, int(budget) - floor * n_classes)


def balance_quotas(class_counts: Sequence[int], cap: int | None = None) -> np.ndarray:
    """Quotas that fill every class up to the largest: quota_c = max_k n_k - n_c (int64, shape (C,)).

    When they total more than `cap`, the cap is split in proportion to them (largest remainder), so the
    smallest classes still get the most and the total is exactly `cap`.
    """
    counts = np.asarray(class_counts)
    if counts.ndim != 1 or counts.size == 0 or not np.issubdtype(counts.dtype, np.integer) or (counts < 0).any():
        raise ValueError(f"class counts must be non-negative integers per class, got {list(class_counts)!r}")
    deficits = (counts.max() - counts).astype(np.int64)
    if cap is None or deficits.sum() <= cap:
        return deficits
    if isinstance(cap, bool) or not isinstance(cap, (int, np.integer)) or cap < 1:
        raise ValueError(f"synthesis.max_budget must be an integer >= 1, got {cap!r}")
    return largest_remainder(deficits / deficits.sum(), int(cap))


@dataclass
class AASState:
    """What the training checkpoint stores about AAS: plain lists, so torch.load(weights_only=True) works."""

    num_classes: int
    accuracy: list[float] | None = None  # None = before the first epoch
    last_quotas: list[int] | None = None

    def update(self, correct: Sequence[int], total: Sequence[int]) -> None:
        """Record the per-class training accuracy of the epoch just finished (counts already all-reduced).

        A class with no samples this epoch keeps its previous accuracy (UNSEEN_ACCURACY if it has none).
        """
        correct_arr = np.asarray(correct, dtype=np.float64)
        total_arr = np.asarray(total, dtype=np.float64)
        if correct_arr.shape != (self.num_classes,) or total_arr.shape != (self.num_classes,):
            raise ValueError(
                f"update() needs {self.num_classes} per-class counts, got shapes "
                f"{correct_arr.shape} and {total_arr.shape}")
        if np.any(total_arr < 0) or np.any(correct_arr < 0) or np.any(correct_arr > total_arr):
            raise ValueError("update() needs 0 <= correct <= total for every class")
        previous = self.accuracy or [UNSEEN_ACCURACY] * self.num_classes
        self.accuracy = [
            float(c / t) if t > 0 else float(prev)
            for c, t, prev in zip(correct_arr, total_arr, previous)
        ]

    def quotas(self, budget: int, temperature: float = 1.0, *, floor: int = 0) -> np.ndarray:
        """This epoch's quotas from the stored accuracy; remembers them in `last_quotas`."""
        q = quotas(self.accuracy, budget, temperature, num_classes=self.num_classes, floor=floor)
        self.last_quotas = [int(v) for v in q]
        return q

    def to_dict(self) -> dict:
        return {
            "num_classes": int(self.num_classes),
            "accuracy": None if self.accuracy is None else [float(v) for v in self.accuracy],
            "last_quotas": None if self.last_quotas is None else [int(v) for v in self.last_quotas],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "AASState":
        return cls(
            num_classes=int(d["num_classes"]),
            accuracy=None if d.get("accuracy") is None else [float(v) for v in d["accuracy"]],
            last_quotas=None if d.get("last_quotas") is None else [int(v) for v in d["last_quotas"]],
        )
