"""Mixup (Zhang et al. 2018) for a batch, with an optional torch.Generator for reproducibility."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["generator_on", "mixup_batch", "mixup_loss", "sample_lam"]


def sample_lam(alpha: float, generator: torch.Generator | None = None) -> float:
    """Draw lam ~ Beta(alpha, alpha).

    torch's Beta/Gamma samplers accept no generator, so with one we draw a seed from it and
    sample inside `fork_rng`: the result depends only on the generator, and the global CPU RNG
    is left exactly as it was.
    """
    if not alpha > 0:  # also rejects NaN
        raise ValueError(f"method.mixup_alpha must be > 0, got {alpha}")
    beta = torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(alpha)))
    if generator is None:
        return float(beta.sample())
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return float(beta.sample())


def generator_on(device: torch.device, generator: torch.Generator) -> torch.Generator:
    """A generator on `device` seeded by one draw from `generator`: the permutation of a batch on a GPU is
    drawn there (a CPU draw copied over would wait for the GPU every batch), and still follows the
    seeded stream. A torch.Generator draws on its own device only."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    return torch.Generator(device=device).manual_seed(seed)


def mixup_batch(
    x: Tensor, y: Tensor, alpha: float, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor, float]:
    """Return (lam * x + (1 - lam) * x[perm], y, y[perm], lam) for a random batch permutation."""
    lam = sample_lam(alpha, generator)
    if generator is not None and generator.device != x.device:
        generator = generator_on(x.device, generator)
    perm = torch.randperm(x.shape[0], generator=generator, device=x.device)
    mixed = lam * x + (1.0 - lam) * x[perm]
    return mixed, y, y[perm.to(y.device)], lam


def mixup_loss(
    loss_fn: Callable[..., Tensor], logits: Tensor, y_a: Tensor, y_b: Tensor, lam: float,
    weight_a: Tensor | None = None, weight_b: Tensor | None = None,
) -> Tensor:
    """Mixup objective: the same convex combination of the two targets' losses. With per-sample weights,
    each target's loss is weighted by its own image's weight (`weight_b` is the permuted images')."""
    if weight_a is None and weight_b is None:
        return lam * loss_fn(logits, y_a) + (1.0 - lam) * loss_fn(logits, y_b)
    return lam * loss_fn(logits, y_a, weight_a) + (1.0 - lam) * loss_fn(logits, y_b, weight_b)
