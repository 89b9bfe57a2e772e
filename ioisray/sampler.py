"""Classifier-guided DDIM sampling from a class-conditional UNet (pure PyTorch, CPU or GPU, no Ray).

Guidance follows Dhariwal & Nichol: eps_hat = eps - s * sqrt(1 - abar_t) * grad_x log p(c | x), and the
DDIM update then uses eps_hat for both the clean-image prediction and the direction term.
Two forms of x (x_t is the default, chosen by measurement: benchmarks/log/2026-11-26.md):
  - "x_t": the classifier sees the noisy x_t (the paper's form).
  - "x0":  the classifier sees the predicted clean image x0_hat = (x_t - sqrt(1-abar_t) eps) / sqrt(abar_t),
           and the gradient is taken w.r.t. x_t through x0_hat with eps detached. Detaching skips a
           backward pass through the UNet (the classifier is far cheaper than the UNet), so both forms
           cost one UNet forward plus one classifier forward/backward per step. With eps detached,
           d x0_hat / d x_t = 1 / sqrt(abar_t), so the x0 form pushes 1/sqrt(abar_t) times harder at
           high noise (~130x at t=980, 1x at t=0) for the same scale s.
With `sampler.guidance_objective: entropy` the classifier term is grad_x H(p(. | x)) instead, so guidance
makes images whose class the classifier is unsure of (feedback-guided synthesis).
Classifier-free guidance (`sampler.cfg_scale` w != 1, for a model with a null class) replaces eps by
eps_null + w (eps_c - eps_null), from one UNet call on the batch twice over (conditional and null labels);
the classifier's term is then added to that eps as above.
Models may predict the noise (epsilon) or the velocity v = sqrt(abar) eps - sqrt(1-abar) x0; a
v-prediction is turned into eps first, so guidance and the DDIM update are the same for both.
Every image draws its own noise from a CPU generator seeded with its seed, so an image depends only on
(seed, label, model, config) and not on which batch it was generated in.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

from ioisray.precision import sampler_dtype
from ioisray.sampler_config import SOLVERS, SamplerConfig
from ioisray.transforms import normalise

# Linear betas 1e-4..0.02 over 1000 steps: DDPM's schedule, and the one guided-diffusion used for its
# 128x128 class-conditional ADM (the model the paper uses). Pretraining and sampling must share it:
# a trained model carries its own schedule (models.diffusion.save_diffusion_model).
NOISE_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
PREDICTION_TYPES = ("epsilon", "v_prediction")
BETA_SCHEDULES = ("linear", "squaredcos_cap_v2")


def make_train_scheduler(beta_schedule: str = "linear", prediction_type: str = "epsilon") -> DDPMScheduler:
    """The noise schedule and target of diffusion pretraining.

    "squaredcos_cap_v2" is the cosine schedule of improved DDPM, which spends fewer steps on near-pure
    noise than the linear one at small image sizes; "v_prediction" keeps the model's clean-image
    estimate accurate at high noise, where an epsilon model's error is amplified by 1/sqrt(abar_t).
    """
    if beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f"diffusion.beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"diffusion.prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    return DDPMScheduler(**{**NOISE_SCHEDULE, "beta_schedule": beta_schedule},
                         prediction_type=prediction_type, clip_sample=False)


def make_scheduler(train_scheduler: DDPMScheduler | DDIMScheduler | None = None, solver: str = "ddim"):
    """DDIM (or a fewer-step multistep solver) over a model's training schedule (default: linear betas),
    stepping on epsilon.

    "dpmsolver++" (DPM-Solver++, 2nd order) and "unipc" are diffusers' multistep solvers, meant for
    10-25 steps; they take the guided eps like DDIM does, with their own (linspace) step spacing.

    clip_sample=False: clipping x0_hat to [-1, 1] at every step discards the part of the guidance
    push that leaves the box, which is largest at high noise. "leading" spacing
    (t = 980, 960, ..., 0 for 50 steps) matches guided-diffusion's "ddim50" respacing;
    set_alpha_to_one makes the last step return the clean prediction.
    """
    config = train_scheduler.config if train_scheduler is not None else make_train_scheduler().config
    if solver == "dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(config, prediction_type="epsilon", algorithm_type="dpmsolver++",
                                                       thresholding=False)
    if solver == "unipc":
        return UniPCMultistepScheduler.from_config(config, prediction_type="epsilon", thresholding=False)
    if solver != "ddim":
        raise ValueError(f"sampler.solver must be one of {SOLVERS}, got {solver!r}")
    return DDIMScheduler.from_config(config, prediction_type="epsilon", clip_sample=False,
                                     set_alpha_to_one=True, timestep_spacing="leading")


def epsilon_from(output: torch.Tensor, x_t: torch.Tensor, abar_t: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The noise estimate from a model's output: itself, or from v = sqrt(abar) eps - sqrt(1-abar) x0."""
    if prediction_type == "v_prediction":
        return abar_t.sqrt() * output + (1 - abar_t).sqrt() * x_t
    return output


@dataclass
class SampleBatch:
    images: torch.Tensor  # uint8 (B, H, W, 3) RGB on CPU, H = W = output size
    labels: torch.Tensor  # int64 (B,)
    seeds: list[int]


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def default_classifier_transform(output_size: int | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """[-1, 1] (B, 3, H, W) -> resized, ImageNet-normalised, as ioisray.transforms does for real images."""

    def transform(x: torch.Tensor) -> torch.Tensor:
        if output_size is not None:
            x = _resize(x, output_size)
        return normalise((x + 1) / 2)

    return transform


def _autocast(device: torch.device, dtype: str | None):
    """bf16 autocast where the device supports it; a no-op context otherwise."""
    if sampler_dtype(dtype, device) != "bfloat16":
        return contextlib.nullcontext()
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _initial_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> tuple[torch.Tensor, list[torch.Generator]]:
    """x_T per image from its own CPU generator; the generators continue to feed eta noise."""
    generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    return torch.stack([torch.randn(shape, generator=g) for g in generators]), generators


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`: to a GPU through pinned memory, without waiting (a copy from pageable
    memory waits for the GPU to finish its queue; the pinned buffer is kept until the copy is done)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def model_epsilon(unet: nn.Module, x: torch.Tensor, t_int: int, labels: torch.Tensor, abar_t: torch.Tensor,
                  prediction_type: str, cfg: SamplerConfig, null_label: int | None = None) -> torch.Tensor:
    """The UNet's noise estimate for x_t (float32), classifier-free guided when cfg.cfg_scale != 1:
    eps_null + w (eps_c - eps_null), the conditional and the null prediction from one call on the batch
    twice over. w = 1 is one conditional call, exactly as without classifier-free guidance."""
    device = x.device
    unet_dtype = next(unet.parameters()).dtype
    w = float(cfg.cfg_scale)
    n = len(labels)
    if w != 1.0:
        if null_label is None:
            raise ValueError(f"sampler.cfg_scale={w:g} needs a diffusion model with a null class (pretrained with "
                             f"diffusion.label_dropout > 0); this one has none")
        x = torch.cat([x, x])
        labels = torch.cat([labels, torch.full_like(labels, null_label)])
    x_in, t_in = x.to(unet_dtype), torch.full((len(labels),), t_int, device=device)
    if cfg.compile:  # one graph for every batch size rather than a recompilation per size
        for tensor in (x_in, t_in, labels):
            torch._dynamo.mark_dynamic(tensor, 0)
    with torch.no_grad(), _autocast(device, cfg.dtype):
        out = unet(x_in, t_in, class_labels=labels).sample
    eps = epsilon_from(out.float(), x, abar_t, prediction_type)
    if w == 1.0:
        return eps
    eps_c, eps_null = eps[:n], eps[n:]
    return eps_null + w * (eps_c - eps_null)


def _guidance_gradient(x_t, eps, abar_t, labels, classifier, transform, cfg, device):
    """grad_{x_t} of the guidance objective summed over the batch, in float32: log p(labels_i | x_i), or the
    predictive entropy of x_i (cfg.guidance_objective); x_i is x_t or x0_hat by cfg.guidance_form."""
    with torch.enable_grad():
        x_in = x_t.detach().float().requires_grad_(True)
        if cfg.guidance_form == "x0":
            x = (x_in - (1 - abar_t).sqrt() * eps.detach()) / abar_t.sqrt()
        else:
            x = x_in
        with _autocast(device, cfg.dtype):
            inputs = transform(x)
            if cfg.compile:  # a compiled guide, like the UNet, keeps one graph for every chunk size
                torch._dynamo.mark_dynamic(inputs, 0)
            logits = classifier(inputs)
        log_probs = F.log_softmax(logits.float(), dim=-1)
        if cfg.guidance_objective == "entropy":  # H = -sum_c p_c log p_c, pushed up
            objective = -(log_probs.exp() * log_probs).sum()
        else:
            objective = log_probs.gather(1, labels[:, None]).sum()
        # autograd.grad leaves the classifier's .grad untouched: only x gets a gradient.
        (grad,) = torch.autograd.grad(objective, x_in)
    return grad


def sample(
    unet: nn.Module,
    labels: Sequence[int] | torch.Tensor,
    seeds: Sequence[int],
    cfg: SamplerConfig,
    *,
    classifier: nn.Module | None = None,
    classifier_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    scheduler: DDPMScheduler | DDIMScheduler | None = None,
    device: torch.device | str | None = None,
    output_size: int | None = None,
) -> SampleBatch:
    """Generate one image per (label, seed) with DDIM, guided by `classifier` when given and s > 0.

    `scheduler` is the model's training noise scheduler (models.diffusion.load_noise_scheduler); None
    means linear betas and epsilon prediction. The UNet and classifier must already be on `device`
    (default: the UNet's device). `output_size` is the size of the returned images and of what the
    classifier sees (None: the UNet's). The batch is processed at once; callers chunk large requests.
    """
    seeds = [int(s) for s in seeds]
    # A copy: labels may arrive as a read-only array (a chunk from Ray's object store).
    labels = torch.tensor(np.asarray(labels, dtype=np.int64).reshape(-1))
    if labels.numel() != len(seeds):
        raise ValueError(f"got {labels.numel()} labels but {len(seeds)} seeds")
    if unet.config.num_class_embeds is None:
        raise ValueError("the UNet is not class-conditional (config.num_class_embeds is None)")
    # A null class (label dropout) is no class to sample.
    null_label = getattr(unet, "null_class_label", None)
    num_classes = unet.config.num_class_embeds - (null_label is not None)
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got {labels.tolist()}")
    if cfg.cfg_scale != 1 and null_label is None:
        raise ValueError(f"sampler.cfg_scale={cfg.cfg_scale:g} needs a diffusion model with a null class (pretrained "
                         f"with diffusion.label_dropout > 0); this one has none: set sampler.cfg_scale=1")

    device = torch.device(device) if device is not None else next(unet.parameters()).device
    size = int(unet.config.sample_size)
    out_size = output_size or size
    if not seeds:
        return SampleBatch(torch.zeros((0, out_size, out_size, 3), dtype=torch.uint8), labels, seeds)
    if cfg.compile and len(seeds) == 1:
        # A compiled UNet specialises batch size 1 (it cannot be dynamic): sample the image twice, in a
        # batch of two, and keep one, rather than compile a second graph for a lone image.
        twice = sample(unet, labels.repeat(2), seeds * 2, cfg, classifier=classifier,
                       classifier_transform=classifier_transform, scheduler=scheduler, device=device,
                       output_size=output_size)
        return SampleBatch(twice.images[:1], labels, seeds)
    prediction_type = scheduler.config.prediction_type if scheduler is not None else "epsilon"
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"the sampler needs an epsilon or v_prediction model, got {prediction_type!r}")
    if scheduler is not None and scheduler.config.get("clip_sample"):
        warnings.warn("scheduler has clip_sample=True, which makes classifier guidance harmful; it is ignored")
    scheduler = make_scheduler(scheduler, cfg.solver)  # our own copy: set_timesteps and steps mutate it
    scheduler.set_timesteps(cfg.steps)
    alphas_cumprod = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)

    guided = classifier is not None and cfg.guidance_scale > 0
    transform = classifier_transform or default_classifier_transform(output_size)
    was_training = classifier.training if classifier is not None else False
    if classifier is not None:
        classifier.eval()

    x, generators = _initial_noise(seeds, (unet.config.in_channels, size, size))
    x = x.to(device)
    labels_dev = labels.to(device)
    try:
        for t in scheduler.timesteps:
            t_int = int(t)
            abar_t = alphas_cumprod[t_int]
            # A compiled UNet sees chunks of several sizes (the ramp, the remainder): model_epsilon marks
            # the batch dimension dynamic.
            eps = model_epsilon(unet, x, t_int, labels_dev, abar_t, prediction_type, cfg, null_label)
            if guided:
                grad = _guidance_gradient(x, eps, abar_t, labels_dev, classifier, transform, cfg, device)
                eps = eps - cfg.guidance_scale * (1 - abar_t).sqrt() * grad
            noise = None
            if cfg.eta > 0:
                noise = _to_device(torch.stack([torch.randn(x.shape[1:], generator=g) for g in generators]), device)
            if cfg.solver == "ddim":
                x = scheduler.step(eps, t_int, x, eta=cfg.eta, variance_noise=noise).prev_sample
            else:
                x = scheduler.step(eps, t_int, x).prev_sample
    finally:
        if classifier is not None:
            classifier.train(was_training)

    images = _resize(x.float().clamp(-1, 1), out_size)
    images = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return SampleBatch(images=images.permute(0, 2, 3, 1).contiguous().cpu(), labels=labels, seeds=seeds)
