"""Recipe: pretrain the class-conditional diffusion model that IOIS samples from, with Ray Train.

    setup    driver: the same data and split as the classifier (same split seed); only the training split
             is used, so no validation or test image leaks into the generator
    train    workers: from a fresh UNet of `diffusion.preset`, or fine-tuning `diffusion.model_dir`;
             noise (epsilon) or velocity (v) prediction loss on DDPM-noised images, DDP, an EMA copy of the
             weights, a sample grid in TensorBoard every `pretrain.sample_every` epochs, a checkpoint
             (UNet, EMA, optimizer, lr schedule, epoch) every epoch
    save     driver: the EMA weights as a diffusers model folder, <run>/unet (safetensors), with the
             noise scheduler it was trained with
    cleanup  driver: shut down the Ray it started
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ioisray import storage
from ioisray.data import provenance
from ioisray.config import Config, ConfigError, RunFinishedError, save_config
from ioisray.models.diffusion import (PRESETS, create_unet, load_noise_scheduler, load_unet,
                                     save_diffusion_model)
from ioisray.precision import autocast, grad_scaler, resolve_precision
from ioisray.recipes.common import (check_resumable, cpu_batches, epoch_generator, fit, new_checkpoint_dir, open_run,
                                    report, restore_or_start, setup_data, tensorboard_location, unwrap, worker_setup)
from ioisray.sampler import SamplerConfig, make_train_scheduler, sample

UNET_DIR = "unet"  # in the final checkpoint and in the run folder


def diffusion_image_size(cfg: Config) -> int:
    return cfg.diffusion.image_size or PRESETS[cfg.diffusion.preset]["sample_size"]


def to_model_space(images: torch.Tensor, hflip: bool, vflip: bool) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1], randomly flipped per image."""
    x = images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    for dim, on in ((3, hflip), (2, vflip)):
        if on:
            flip = torch.rand(x.shape[0], device=x.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(dim), x)
    return x


def initial_unet(cfg: Config, num_classes: int, image_size: int):
    """A fresh UNet of the preset, or, with diffusion.model_dir set, that model to fine-tune."""
    if not cfg.diffusion.model_dir:
        return create_unet(cfg.diffusion.preset, num_classes, image_size)
    unet = load_unet(cfg.diffusion.model_dir, num_classes)
    if int(unet.config.sample_size) != image_size:
        raise ConfigError(f"diffusion.model_dir: {cfg.diffusion.model_dir!r} makes "
                          f"{unet.config.sample_size}px images but diffusion.image_size is {image_size}")
    return unet


def training_noise_scheduler(cfg: Config):
    """The noise schedule and prediction target: the fine-tuned model's own, or the config's for a new one."""
    d = cfg.diffusion
    if not d.model_dir:
        return make_train_scheduler(d.beta_schedule or "linear", d.prediction_type or "epsilon")
    scheduler = load_noise_scheduler(d.model_dir)
    for key in ("prediction_type", "beta_schedule"):
        wanted, found = getattr(d, key), scheduler.config[key]
        if wanted is not None and wanted != found:
            raise ConfigError(f"diffusion.{key}={wanted!r}, but diffusion.model_dir {d.model_dir!r} was trained "
                              f"with {found!r}; leave diffusion.{key} unset to fine-tune it as it is")
    return scheduler


def denoising_target(noise_scheduler, x0, noise, t):
    """What the UNet learns to predict from x_t: the noise, or the velocity sqrt(abar) eps - sqrt(1-abar) x0."""
    if noise_scheduler.config.prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(x0, noise, t)
    return noise


def sample_grid(unet, noise_scheduler, num_classes: int, per_class: int, steps: int, device,
                seed: int = 0) -> torch.Tensor:
    """(3, H', W') uint8 grid: one row per class, unguided, fixed seeds so grids compare across epochs."""
    from torchvision.utils import make_grid

    labels = [c for c in range(num_classes) for _ in range(per_class)]
    batch = sample(unet, labels, [seed + i for i in range(len(labels))], SamplerConfig(steps=steps),
                   scheduler=noise_scheduler, device=device)
    return make_grid(batch.images.permute(0, 3, 1, 2), nrow=per_class, padding=1)


def train_loop_per_worker(loop_config: dict) -> None:
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    import ray.train
    import ray.train.torch

    cfg = Config.model_validate(loop_config["config"])
    p = cfg.pretrain
    num_classes, image_size = loop_config["num_classes"], loop_config["image_size"]
    rank, world, device = worker_setup(cfg)

    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    unet = initial_unet(cfg, num_classes, image_size)
    ema = EMAModel(unet.parameters(), decay=p.ema_decay)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    lr_schedule = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=p.warmup_steps)
    noise_scheduler = training_noise_scheduler(cfg)
    state, resumed = restore_or_start(cfg, unet, optimizer, lr_schedule)
    if resumed:
        ema.load_state_dict(state.extra["ema"])
        if rank == 0:
            print(f"[ioisray] resumed diffusion pretraining from epoch {state.epoch}", flush=True)
    ema.to(device)
    precision = resolve_precision(cfg.train.precision, device)
    scaler = grad_scaler(device, precision)
    unet = ray.train.torch.prepare_model(unet)
    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        events = storage.EventsDir(loop_config["tensorboard_dir"], loop_config["tensorboard_uri"])
        writer = SummaryWriter(events.path)
    shard = ray.train.get_dataset_shard("train")

    for epoch in range(state.epoch, p.epochs):
        unet.train()
        epoch_generator(cfg, rank, epoch)  # noise and timesteps replay on resume
        start, loss_sum, n_seen = time.perf_counter(), torch.zeros((), device=device), 0
        for i, batch in enumerate(shard.iter_torch_batches(batch_size=p.batch_size, dtypes=None,
                                                           local_shuffle_buffer_size=2048, **cpu_batches(device))):
            if p.max_batches_per_epoch and i >= p.max_batches_per_epoch:
                break
            x0 = to_model_space(batch["image"].to(device, non_blocking=True), p.hflip, p.vflip)
            y = batch["label"].to(device, dtype=torch.long, non_blocking=True)
            noise = torch.randn_like(x0)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (x0.shape[0],), device=device)
            x_t = noise_scheduler.add_noise(x0, noise, t)
            with autocast(device, precision):
                prediction = unet(x_t, t, class_labels=y).sample
            # The loss in float32, whatever the autocast dtype of the UNet's output.
            loss = F.mse_loss(prediction.float(), denoising_target(noise_scheduler, x0, noise, t))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            lr_schedule.step()
            ema.step(unwrap(unet).parameters())
            loss_sum += loss.detach() * len(y)
            n_seen += len(y)
            if rank == 0 and (i + 1) % 50 == 0:
                print(f"[ioisray]   batch {i + 1} loss {loss.item():.4f}", flush=True)
        seconds = time.perf_counter() - start
        metrics = {"epoch": epoch, "loss": float(loss_sum) / max(n_seen, 1), "epoch_seconds": seconds,
                   "lr": lr_schedule.get_last_lr()[0]}
        ckpt_dir = None
        last = epoch + 1 == p.epochs
        if rank == 0:
            writer.add_scalar("pretrain/loss", metrics["loss"], epoch)
            writer.add_scalar("pretrain/lr", metrics["lr"], epoch)
            writer.add_scalar("pretrain/images_per_second", n_seen * world / max(seconds, 1e-9), epoch)
            ckpt_dir = new_checkpoint_dir()
            if last or (p.sample_every and (epoch + 1) % p.sample_every == 0):
                ema_unet = _ema_copy(unwrap(unet), ema)
                writer.add_image("pretrain/samples_ema", sample_grid(ema_unet, noise_scheduler, num_classes, 8,
                                                                     p.sample_steps, device), epoch)
                if last:  # the product of this recipe: the EMA weights as a diffusers model
                    save_diffusion_model(ema_unet, noise_scheduler, Path(ckpt_dir) / UNET_DIR)
            writer.flush()
            events.sync()
            print(f"[ioisray] diffusion epoch {epoch + 1}/{p.epochs} loss {metrics['loss']:.4f} "
                  f"({n_seen * world / max(seconds, 1e-9):.1f} img/s, {seconds:.1f}s)", flush=True)
            state.epoch = epoch + 1
            state.model, state.optimizer = unwrap(unet).state_dict(), optimizer.state_dict()
            state.scheduler, state.extra["ema"] = lr_schedule.state_dict(), ema.state_dict()
            state.save(ckpt_dir)
        report(metrics, ckpt_dir)
    if writer is not None:
        writer.close()
        events.sync()


def _ema_copy(unet, ema):
    """A copy of the UNet carrying the EMA weights (the live weights stay untouched)."""
    import copy

    ema_unet = copy.deepcopy(unet)
    ema.copy_to(ema_unet.parameters())
    return ema_unet.eval()


def record_training_images(cfg: Config, ds, train_rows, model_dir: Path) -> None:
    """Which images the model has seen (see data/provenance.py): this training split, plus, when
    fine-tuning, the starting model's. A starting model without a record leaves none: a partial one
    would vouch for images the model may have seen."""
    keys = set(provenance.image_keys(ds, train_rows, provenance.data_folder(cfg.data)))
    if cfg.diffusion.model_dir:
        before = provenance.training_images(storage.fetch_dir(cfg.diffusion.model_dir))
        if before is None:
            print(f"[ioisray] warning: {cfg.diffusion.model_dir} has no record of its training images, so "
                  f"neither has the fine-tuned model", flush=True)
            return
        keys |= before
    provenance.write_training_images(model_dir, cfg.data.name, sorted(keys))


def pretrain_diffusion(cfg: Config) -> Path:
    """Run the recipe; returns the folder of the saved diffusers UNet."""
    from ioisray.data.ray_dataset import to_ray_dataset

    run_dir = open_run(cfg)
    final = run_dir / UNET_DIR
    if final.exists():
        raise RunFinishedError(f"{final} already exists: this pretraining run has finished. Use it with "
                               f"diffusion.model_dir={final}, or choose another name=...")
    check_resumable(cfg, run_dir)
    image_size = diffusion_image_size(cfg)
    ds, splits = setup_data(cfg, image_size=image_size)
    try:  # fail here, naming the key, rather than inside the Ray workers after start-up
        initial_unet(cfg, ds.num_classes, image_size)
        training_noise_scheduler(cfg)
    except ConfigError:
        raise
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"diffusion.image_size / diffusion.preset / diffusion.model_dir: {e}") from None
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    storage.push(run_dir, cfg.run_location)
    train_ds = ds.subset(splits["train"])  # the training split only: no leakage into the generator
    loop_config = {"config": cfg.model_dump(mode="json"), "num_classes": ds.num_classes, "image_size": image_size,
                   **tensorboard_location(cfg)}
    result = fit(cfg, train_loop_per_worker, loop_config,
                 lambda _: {"train": to_ray_dataset(train_ds.images, train_ds.labels, sampling="natural",
                                                  seed=cfg.seed)})
    # Copy the model out of the last checkpoint, then rename: a half-copied folder never looks done.
    with result.checkpoint.as_directory() as d:
        tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=".unet-"))
        shutil.copytree(Path(d) / UNET_DIR, tmp, dirs_exist_ok=True)
    record_training_images(cfg, ds, splits["train"], tmp)
    tmp.rename(final)
    load_unet(str(final), ds.num_classes)  # fail here, not later, if it does not reload
    load_noise_scheduler(final)
    storage.push(run_dir, cfg.run_location)
    print(f"[ioisray] diffusion model saved: {storage.join(cfg.run_location, UNET_DIR)}", flush=True)
    return final
