"""Recipe: pretrain the class-conditional diffusion model that IOIS samples from, with Ray Train.

    setup    driver: the same data and split as the classifier (same split seed); only the training split
             is used, so no validation or test image leaks into the generator
    train    workers: from a fresh UNet of `diffusion.preset`, or fine-tuning `diffusion.model_dir`;
             noise (epsilon) or velocity (v) prediction loss on DDPM-noised images, DDP, an EMA copy of the
             weights, a sample grid in TensorBoard every `pretrain.sample_every` epochs, a checkpoint
             (UNet, EMA, optimizer, lr schedule, epoch) every epoch, the EMA model as a diffusers folder
             in <run>/snapshots/epoch_<n> every `pretrain.snapshot_every` epochs (but the last: that is
             the run's model)
    save     driver: the EMA weights as a diffusers model folder, <run>/unet (safetensors), with the
             noise scheduler it was trained with and the record of the images it trained on
    cleanup  driver: shut down the Ray it started, release the run
"""
from __future__ import annotations

import functools
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ioisray import storage
from ioisray.atomic import temporary_dir
from ioisray.checkpoint import FINAL
from ioisray.config import Config, ConfigError
from ioisray.data import provenance
from ioisray.data.setup import setup_data
from ioisray.models.wrapping import unwrap
from ioisray.models.diffusion import (PRESETS, create_unet, load_noise_scheduler, load_unet, null_class,
                                     save_diffusion_model)
from ioisray.precision import autocast, grad_scaler, resolve_precision
from ioisray.recipes.console import say
from ioisray.recipes.launch import fit, ray_session
from ioisray.recipes.worker import Worker, locations
from ioisray.run import Run, run_location
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
    """A fresh UNet of the preset (with a null class when labels are dropped), or, with
    diffusion.model_dir set, that model to fine-tune."""
    d = cfg.diffusion
    if not d.model_dir:
        return create_unet(d.preset, num_classes, image_size, null_class_label=d.label_dropout > 0)
    unet = load_unet(d.model_dir, num_classes)
    if int(unet.config.sample_size) != image_size:
        raise ConfigError(f"diffusion.model_dir: {d.model_dir!r} makes "
                          f"{unet.config.sample_size}px images but diffusion.image_size is {image_size}")
    if d.label_dropout > 0 and null_class(unet) is None:
        raise ConfigError(f"diffusion.label_dropout={d.label_dropout} needs a null class, which the model in "
                          f"diffusion.model_dir {d.model_dir!r} lacks; fine-tune it with label_dropout=0")
    return unet


def drop_labels(y: torch.Tensor, null: int | None, p: float) -> torch.Tensor:
    """Each label replaced by the null class with probability p (classifier-free guidance training)."""
    if null is None or p <= 0:
        return y
    return torch.where(torch.rand(y.shape, device=y.device) < p, torch.full_like(y, null), y)


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

    from ioisray.data.ray_dataset import set_epoch

    cfg = Config.model_validate(loop_config["config"])
    p = cfg.pretrain
    num_classes, image_size = loop_config["num_classes"], loop_config["image_size"]
    worker = Worker(cfg, loop_config)
    shard = worker.shard("train")
    device = worker.device

    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    unet = initial_unet(cfg, num_classes, image_size)
    ema = EMAModel(unet.parameters(), decay=p.ema_decay)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    lr_schedule = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=p.warmup_steps)
    noise_scheduler = training_noise_scheduler(cfg)
    null = null_class(unet)
    unet, state = worker.prepare_and_resume(unet, optimizer, lr_schedule, what="diffusion pretraining ")
    if state.epoch:
        ema.load_state_dict(state.extra["ema"])
    ema.to(device)
    precision = resolve_precision(cfg.train.precision, device)
    scaler = grad_scaler(device, precision)

    first_epoch = state.epoch
    for epoch in worker.epochs(state, p.epochs):  # noise and timesteps replay on resume
        if worker.rank == 0:  # this epoch's order of the training rows (see data/ray_dataset.py)
            set_epoch(loop_config["epoch_counter"], epoch)
        unet.train()
        start, loss_sum, n_seen = time.perf_counter(), torch.zeros((), device=device), 0
        for i, batch in enumerate(worker.batches(shard, p.batch_size, local_shuffle_buffer_size=2048)):
            if p.max_batches_per_epoch and i >= p.max_batches_per_epoch:
                break
            x0 = to_model_space(batch["image"].to(device, non_blocking=True), p.hflip, p.vflip)
            y = drop_labels(batch["label"].to(device, dtype=torch.long, non_blocking=True), null,
                            cfg.diffusion.label_dropout)
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
            if worker.rank == 0 and (i + 1) % 50 == 0:
                say(cfg.name, f"  batch {i + 1} loss {loss.item():.4f}")
        seconds = time.perf_counter() - start
        loss, n_seen = epoch_loss(loss_sum, n_seen)  # every worker's images, not rank 0's alone
        metrics = {"epoch": epoch, "loss": loss, "epoch_seconds": seconds, "lr": lr_schedule.get_last_lr()[0]}
        last = epoch + 1 == p.epochs
        files = {}
        if worker.rank == 0:
            rate = n_seen / max(seconds, 1e-9)
            for key, value in (("loss", metrics["loss"]), ("lr", metrics["lr"]), ("images_per_second", rate)):
                worker.writer.add_scalar(f"pretrain/{key}", value, epoch)
            grid, snapshot = (every and (epoch + 1) % every == 0 for every in (p.sample_every, p.snapshot_every))
            if last or grid or snapshot:
                ema_unet = _ema_copy(unwrap(unet), ema)
            if last or grid:
                worker.writer.add_image("pretrain/samples_ema", sample_grid(ema_unet, noise_scheduler, num_classes, 8,
                                                                            p.sample_steps, device), epoch)
            if last:  # the product of this recipe: the EMA weights as a diffusers model
                files = _model_files(ema_unet, noise_scheduler)
            elif snapshot:
                _write_snapshot(loop_config["snapshots"], epoch + 1,
                                {**_model_files(ema_unet, noise_scheduler), **loop_config["training_record"]})
            if last or epoch == first_epoch or (epoch + 1) % max(1, p.epochs // 10) == 0:  # ten lines a run
                left = "" if last else f"; about {_duration((p.epochs - epoch - 1) * seconds)} left"
                say(cfg.name, f"diffusion epoch {epoch + 1}/{p.epochs} loss {metrics['loss']:.4f} "
                              f"({rate:.1f} img/s, {seconds:.1f}s{left})")
            state.epoch = epoch + 1
            state.model, state.optimizer = unwrap(unet).state_dict(), optimizer.state_dict()
            state.scheduler, state.extra["ema"] = lr_schedule.state_dict(), ema.state_dict()
        worker.end_epoch(metrics, state, files, name=FINAL if last else None)
    worker.close()


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _model_files(unet, noise_scheduler) -> dict[str, bytes]:
    """The diffusers folder of a model (UNet weights as safetensors, configs, the noise scheduler) as
    {relative path: bytes}, for the final checkpoint."""
    with tempfile.TemporaryDirectory() as tmp:
        save_diffusion_model(unet, noise_scheduler, tmp)
        return {f"{UNET_DIR}/{f.relative_to(tmp).as_posix()}": f.read_bytes()
                for f in Path(tmp).rglob("*") if f.is_file()}


def _write_snapshot(location: str, epoch: int, files: dict[str, bytes]) -> None:
    """<location>/epoch_<n>/: the model folder of `files`, its weights written last, so a folder cut short
    by an interruption has no weights and fails to load, by name, instead of loading half a model."""
    folder = storage.join(location, f"epoch_{epoch:05d}")
    for name in sorted(files, key=lambda n: n.endswith(".safetensors")):
        storage.write_bytes(storage.join(folder, name[len(UNET_DIR) + 1:]), files[name])


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


def pretraining_datasets(cfg: Config, train_ds, handles: dict) -> dict:
    """The training split, read in a new order each epoch (the epoch rank 0 gives `handles`' counter)."""
    from ioisray.data.ray_dataset import to_ray_dataset

    return {"train": to_ray_dataset(train_ds.images, train_ds.labels, sampling="natural", seed=cfg.seed,
                                    epoch_counter=handles["epoch_counter"])}


def epoch_loss(loss_sum: torch.Tensor, images: int) -> tuple[float, int]:
    """(mean loss, images) of an epoch over every worker, from each worker's summed loss and image count."""
    from ioisray.distributed import all_reduce_sum

    total = all_reduce_sum(torch.tensor([float(loss_sum), float(images)], dtype=torch.float64))
    return float(total[0]) / max(float(total[1]), 1.0), int(total[1])


def pretrain_diffusion(cfg: Config) -> Path:
    """Run the recipe; returns the folder of the saved diffusers UNet."""
    from ioisray.data.ray_dataset import epoch_counter_service

    with Run(cfg, done_file=UNET_DIR, when_finished="use its model with diffusion.model_dir="
             f"{run_location(cfg)}/{UNET_DIR}") as run:
        image_size = diffusion_image_size(cfg)
        ds, splits = setup_data(cfg, image_size=image_size)
        try:  # fail here, naming the key, rather than inside the Ray workers after start-up
            initial_unet(cfg, ds.num_classes, image_size)
            training_noise_scheduler(cfg)
        except ConfigError:
            raise
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"diffusion.image_size / diffusion.preset / diffusion.model_dir: {e}") from None
        run.start(epochs=cfg.pretrain.epochs)
        train_ds = ds.subset(splits["train"])  # the training split only: no leakage into the generator
        with tempfile.TemporaryDirectory() as tmp:  # the record of training images each model folder carries
            record_training_images(cfg, ds, splits["train"], Path(tmp))
            record = {f"{UNET_DIR}/{f.name}": f.read_bytes() for f in Path(tmp).iterdir()}
        loop_config = {"config": cfg.model_dump(mode="json"), "num_classes": ds.num_classes,
                       "image_size": image_size, "snapshots": run.uri(storage.SNAPSHOTS), "training_record": record,
                       **locations(run)}
        where = (f"on {cfg.ray.num_workers} Ray Train worker{'s' if cfg.ray.num_workers > 1 else ''}"
                 if cfg.ray.num_workers else "in this process")
        say(cfg.name, f"pretraining the {cfg.diffusion.preset} diffusion model at {image_size} px: {cfg.pretrain.epochs} "
                      f"epochs on {len(train_ds.labels)} training images, {where}")
        try:
            with ray_session(cfg, data_bytes=train_ds.images.nbytes):  # the object store sized for the images
                fit(cfg, train_loop_per_worker, loop_config, functools.partial(pretraining_datasets, cfg, train_ds),
                    services=epoch_counter_service)
        except KeyboardInterrupt:
            raise run.interrupted(cfg.pretrain.epochs) from None
        if not run.checkpoints.complete(FINAL):  # Ray Train's own Ctrl-C handler ends fit() quietly
            raise run.interrupted(cfg.pretrain.epochs)
        # Written next to the run, then renamed: a half-written folder never looks done.
        final = run.dir / UNET_DIR
        tmp = temporary_dir(run.dir, ".unet-")
        model = {name: run.checkpoints.read(FINAL, name) for name in run.checkpoints.files(FINAL)}
        for name, data in {**model, **record}.items():
            if name.startswith(f"{UNET_DIR}/"):
                target = tmp / name[len(UNET_DIR) + 1:]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
        tmp.rename(final)
        load_unet(str(final), ds.num_classes)  # fail here, not later, if it does not reload
        load_noise_scheduler(final)
        run.push()
        run.drop_checkpoints()
    print(f"[ioisray] diffusion model saved: {run.uri(UNET_DIR)}", flush=True)
    return final
