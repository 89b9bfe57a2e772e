"""Class-imbalance losses and the `create_loss` factory.

Every loss takes (B, C) logits and (B,) int64 targets and returns a scalar; an optional (B,)
`sample_weight` (e.g. a smaller weight for synthetic images, `synthesis.loss_weight`) makes that scalar
the weighted mean of the per-sample losses. Without it each loss computes exactly what it did before.
Per-class weights, margins and priors are derived once from the training-split
class counts and registered as buffers, so `loss.to(device)` moves them with it.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LOSS_NAMES",
    "ImbalanceLoss",
    "CrossEntropyLoss",
    "FocalLoss",
    "LDAMDRWLoss",
    "LogitAdjustedLoss",
    "create_loss",
    "inverse_frequency_weights",
    "class_balanced_weights",
]

LOSS_NAMES = ("ce", "weighted_ce", "focal", "cb_focal", "ldam_drw", "balanced_softmax", "logit_adjusted")


def _counts_tensor(class_counts: Sequence[int]) -> Tensor:
    """Validate counts and return them as float64 (weights are computed in double, stored as float32)."""
    counts = [float(n) for n in class_counts]
    if not counts:
        raise ValueError("class_counts is empty: need the training-split image count of every class")
    for idx, n in enumerate(counts):
        if not n > 0:  # also rejects NaN
            raise ValueError(
                f"class_counts[{idx}] = {class_counts[idx]}: class {idx} has no training images; "
                "every class needs a positive count (drop the class or fix the split)"
            )
    return torch.tensor(counts, dtype=torch.float64)


def _cross_entropy(logits: Tensor, target: Tensor, weight: Tensor | None, sample_weight: Tensor | None) -> Tensor:
    """F.cross_entropy's (class-)weighted mean, with per-sample weights multiplied into it: the sum of
    s_i w_{y_i} l_i over the sum of s_i w_{y_i}, as F.cross_entropy normalises by the sum of w_{y_i}."""
    if sample_weight is None:
        return F.cross_entropy(logits, target, weight=weight)
    per_sample = F.cross_entropy(logits, target, weight=weight, reduction="none")  # w_{y_i} l_i
    norm = sample_weight if weight is None else sample_weight * weight[target]
    return (per_sample * sample_weight).sum() / norm.sum()


def _normalise(w: Tensor) -> Tensor:
    # Sum to C so the average class weight is 1 and the loss scale stays comparable to plain CE.
    return (w * (w.numel() / w.sum())).float()


def inverse_frequency_weights(class_counts: Sequence[int], power: float = 1.0) -> Tensor:
    """w_c proportional to (1 / n_c) ** power, normalised so that sum_c w_c = C."""
    return _normalise(_counts_tensor(class_counts).reciprocal().pow(power))


def class_balanced_weights(class_counts: Sequence[int], beta: float) -> Tensor:
    """Cui et al. 2019: w_c proportional to (1 - beta) / (1 - beta ** n_c), normalised to sum C."""
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"class-balanced beta must be in [0, 1), got {beta}")
    counts = _counts_tensor(class_counts)
    return _normalise((1.0 - beta) / (1.0 - torch.pow(beta, counts)))


class ImbalanceLoss(nn.Module):
    """Base class: checks the class dimension and computes in float32 (safe under bf16/fp16 autocast)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, logits: Tensor, target: Tensor, sample_weight: Tensor | None = None) -> Tensor:
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"expected logits of shape (B, {self.num_classes}), got {tuple(logits.shape)}: "
                "the model's head and class_counts disagree on the number of classes"
            )
        if sample_weight is None:
            return self.loss(logits.float(), target)
        if sample_weight.shape != target.shape:
            raise ValueError(f"sample_weight has shape {tuple(sample_weight.shape)}, but the batch has "
                             f"{tuple(target.shape)} targets")
        return self.loss(logits.float(), target, sample_weight.float())

    def loss(self, logits: Tensor, target: Tensor, sample_weight: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """Hook for epoch-dependent schedules (LDAM-DRW); a no-op by default."""


class CrossEntropyLoss(ImbalanceLoss):
    """Cross-entropy, optionally class-weighted (weighted mean over the batch, as F.cross_entropy does)."""

    def __init__(self, num_classes: int, weight: Tensor | None = None):
        super().__init__(num_classes)
        self.register_buffer("weight", weight)

    def loss(self, logits: Tensor, target: Tensor, sample_weight: Tensor | None = None) -> Tensor:
        return _cross_entropy(logits, target, self.weight, sample_weight)


class FocalLoss(ImbalanceLoss):
    """Focal loss (Lin et al. 2017), optionally class-weighted (CB-focal); plain mean over the batch (with
    per-sample weights s_i: sum of s_i times the term over the sum of s_i)."""

    def __init__(self, num_classes: int, gamma: float = 2.0, weight: Tensor | None = None):
        super().__init__(num_classes)
        self.gamma = gamma
        self.register_buffer("weight", weight)

    def loss(self, logits: Tensor, target: Tensor, sample_weight: Tensor | None = None) -> Tensor:
        logp_t = logits.log_softmax(dim=1).gather(1, target[:, None]).squeeze(1)
        # (1 - p_t) computed as -expm1(log p_t) stays accurate when p_t is close to 1.
        per_sample = -torch.pow(-torch.expm1(logp_t), self.gamma) * logp_t
        if self.weight is not None:
            per_sample = per_sample * self.weight[target]
        if sample_weight is not None:
            return (per_sample * sample_weight).sum() / sample_weight.sum()
        return per_sample.mean()


class LDAMDRWLoss(ImbalanceLoss):
    """LDAM (Cao et al. 2019) with Deferred Re-Weighting from `drw_epoch` on.

    Expects cosine logits in [-1, 1] from a normalised head (`models.NormedLinear`), as in the paper:
    `scale` (s = 30) multiplied into raw, unbounded logits makes training diverge.
    """

    def __init__(
        self,
        class_counts: Sequence[int],
        max_margin: float = 0.5,
        scale: float = 30.0,
        drw_epoch: int = 160,
        drw_beta: float = 0.9999,
    ):
        counts = _counts_tensor(class_counts)
        super().__init__(counts.numel())
        margins = counts.pow(-0.25)  # m_c proportional to n_c^(-1/4)
        self.register_buffer("margins", (margins * (max_margin / margins.max())).float())
        self.register_buffer("drw_weight", class_balanced_weights(class_counts, drw_beta))
        self.scale = scale
        self.drw_epoch = drw_epoch
        self.reweight = False

    def set_epoch(self, epoch: int) -> None:
        self.reweight = epoch >= self.drw_epoch

    def loss(self, logits: Tensor, target: Tensor, sample_weight: Tensor | None = None) -> Tensor:
        # Subtract the margin from the true-class logit only.
        margin = F.one_hot(target, self.num_classes).to(logits.dtype) * self.margins[target, None]
        weight = self.drw_weight if self.reweight else None
        return _cross_entropy(self.scale * (logits - margin), target, weight, sample_weight)


class LogitAdjustedLoss(ImbalanceLoss):
    """Logit-adjusted CE (Menon et al. 2021): CE on logits + tau * log(prior).

    tau = 1 is Balanced Softmax (Ren et al. 2020), which `create_loss` builds from this class.
    """

    def __init__(self, class_counts: Sequence[int], tau: float = 1.0):
        counts = _counts_tensor(class_counts)
        super().__init__(counts.numel())
        self.register_buffer("adjustment", (tau * (counts / counts.sum()).log()).float())

    def loss(self, logits: Tensor, target: Tensor, sample_weight: Tensor | None = None) -> Tensor:
        return _cross_entropy(logits + self.adjustment, target, None, sample_weight)


def create_loss(
    name: str,
    class_counts: Sequence[int],
    *,
    focal_gamma: float = 2.0,
    cb_beta: float = 0.9999,
    weight_power: float = 1.0,
    ldam_max_margin: float = 0.5,
    ldam_scale: float = 30.0,
    drw_epoch: int = 160,
    drw_beta: float = 0.9999,
    la_tau: float = 1.0,
) -> ImbalanceLoss:
    """Build the loss selected by `method.loss` from the training-split class counts."""
    if name not in LOSS_NAMES:
        raise ValueError(f"unknown method.loss {name!r}; choose one of {', '.join(LOSS_NAMES)}")
    num_classes = _counts_tensor(class_counts).numel()  # validates counts for every loss, even plain CE
    if name == "ce":
        return CrossEntropyLoss(num_classes)
    if name == "weighted_ce":
        return CrossEntropyLoss(num_classes, inverse_frequency_weights(class_counts, weight_power))
    if name == "focal":
        return FocalLoss(num_classes, focal_gamma)
    if name == "cb_focal":
        return FocalLoss(num_classes, focal_gamma, class_balanced_weights(class_counts, cb_beta))
    if name == "ldam_drw":
        return LDAMDRWLoss(class_counts, ldam_max_margin, ldam_scale, drw_epoch, drw_beta)
    if name == "balanced_softmax":
        return LogitAdjustedLoss(class_counts, tau=1.0)
    return LogitAdjustedLoss(class_counts, tau=la_tau)
