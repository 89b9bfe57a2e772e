"""What a classifier run trains with, from its config: the optimizer and its learning-rate schedule,
and the loss, whose class statistics come from the images the epoch trains on (plain PyTorch, no Ray).

With synthesis on, an epoch trains on every real image plus that epoch's synthetic ones, so a loss
built on class counts (class-weighted CE, class-balanced focal, LDAM-DRW, balanced softmax,
logit-adjusted CE) uses real + this epoch's synthetic counts: the distribution the classifier
actually sees that epoch, which changes with AAS's quotas. Counting real images only would correct
for an imbalance the synthetic images have already reduced, twice.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from ioisray.config import Config
from ioisray.losses import create_loss

COUNT_BASED_LOSSES = ("weighted_ce", "cb_focal", "ldam_drw", "balanced_softmax", "logit_adjusted")


def build_optimizer(cfg: Config, model: torch.nn.Module):
    t = cfg.train
    if t.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum,
                              weight_decay=t.weight_decay, nesterov=t.momentum > 0)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    # Stepped once per epoch.
    main_epochs = max(1, t.epochs - t.warmup_epochs)
    if t.schedule == "cosine":
        main = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=main_epochs)
    elif t.schedule == "multistep":
        main = torch.optim.lr_scheduler.MultiStepLR(
            opt, milestones=[m - t.warmup_epochs for m in t.milestones], gamma=t.gamma)
    else:
        main = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
    if t.warmup_epochs == 0:
        return opt, main
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=t.warmup_epochs)
    return opt, torch.optim.lr_scheduler.SequentialLR(opt, [warm, main], milestones=[t.warmup_epochs])


def epoch_class_counts(real_counts: Sequence[int], quotas: Optional[Sequence[int]] = None) -> np.ndarray:
    """Images per class an epoch trains on: the real training images plus the epoch's synthetic quota."""
    counts = np.asarray(real_counts, dtype=np.int64)
    return counts if quotas is None else counts + np.asarray(quotas, dtype=np.int64)


def prior_counts(cfg: Config, real_counts: Sequence[int], quotas: Optional[Sequence[int]]) -> np.ndarray:
    """The class counts a count-based loss is built from this epoch, as `method.prior_counts` says."""
    return epoch_class_counts(real_counts, quotas if cfg.method.prior_counts == "real_and_synthetic" else None)


def build_loss(cfg: Config, class_counts) -> torch.nn.Module:
    """The loss of `method.loss` for an epoch whose images per class are `class_counts`."""
    m = cfg.method
    drw_epoch = m.drw_epoch if m.drw_epoch is not None else int(0.8 * cfg.train.epochs)
    return create_loss(m.loss, class_counts, focal_gamma=m.focal_gamma, cb_beta=m.cb_beta,
                       weight_power=m.weight_power, ldam_max_margin=m.ldam_max_margin,
                       ldam_scale=m.ldam_scale, drw_epoch=drw_epoch, drw_beta=m.drw_beta,
                       la_tau=m.la_tau)
