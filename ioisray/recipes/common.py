"""Driver and worker plumbing shared by the recipes: data set-up, Ray start-up, one Ray Train fit."""
from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ioisray import storage
from ioisray.checkpoint import TrainingState
from ioisray.config import Config, ConfigError, load_config
from ioisray.data import ImageDataset, load_dataset, split_dataset


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
    print(f"[ioisray] data {d.name}: {len(ds.labels)} images, {ds.num_classes} classes, splits {sizes}, "
          f"train per class {dict(zip(ds.class_names, counts.tolist()))}"
          + (f", skipped {len(ds.skipped)} bad images" if ds.skipped else "")
          + (f", {ds.duplicates} images listed twice or more (each kept in one split)" if ds.duplicates else "")
          + f" ({time.perf_counter() - t0:.1f}s)", flush=True)
    for src, why in ds.skipped:
        print(f"[ioisray] skipped {src}: {why}", flush=True)
    return ds, splits


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def open_run(cfg: Config) -> Path:
    """The run's local folder, with a URI run's small files downloaded into it (to resume, or to see
    that it has finished); a URI pyarrow cannot open is an error naming output_dir."""
    if storage.is_uri(cfg.output_dir):
        try:
            storage.pull(cfg.run_dir, cfg.run_location)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return cfg.run_dir


def tensorboard_location(cfg: Config) -> dict:
    """Loop-config entries telling rank 0 where TensorBoard events go (see storage.EventsDir)."""
    uri = storage.join(cfg.run_location, "tensorboard") if storage.is_uri(cfg.output_dir) else None
    return {"tensorboard_dir": str(cfg.run_dir / "tensorboard"), "tensorboard_uri": uri}


def check_resumable(cfg: Config, run_dir: Path) -> None:
    """A run folder with checkpoints resumes only under the config it started with.

    Another seed or split fraction would, for instance, change the split under a half-trained model
    and let it be selected or tested on images it trained on. Only `ray.*` (where it runs) may change.
    """
    old_path = run_dir / "config.yaml"
    if not old_path.is_file() or not storage.exists(storage.join(cfg.run_location, storage.CHECKPOINTS)):
        return
    old = _flatten(load_config(old_path).model_dump(mode="json"))
    new = _flatten(cfg.model_dump(mode="json"))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and not k.startswith("ray."))
    if changed:
        raise ConfigError(f"{run_dir} holds checkpoints of a run started with other values of "
                          f"{', '.join(changed)} (see its config.yaml); resume it with the same values "
                          f"or choose another name=...")


def init_ray(cfg: Config) -> bool:
    """Connect to (or start) Ray; returns True when this process started it and must shut it down."""
    import ray

    if ray.is_initialized():
        return False
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, logging_level="WARNING")
        return True
    # A private local Ray. Logical CPUs beyond the physical ones leave room for Ray Data's read tasks
    # beside the training workers, which otherwise wait for a free CPU forever on a small machine.
    # At least what one run holds: its workers, its synthesis actors, and room for Ray Data's reads.
    from ioisray.experiments import trial_resources

    needed = math.ceil(trial_resources(cfg.model_copy(update={"ray": cfg.ray.model_copy(update={
        "num_workers": max(1, cfg.ray.num_workers)})}))["CPU"])
    num_cpus = cfg.ray.local_num_cpus or max(2 * (os.cpu_count() or 1), needed)
    ray.init(num_cpus=num_cpus, object_store_memory=cfg.ray.object_store_mb * 2**20, logging_level="WARNING",
             # Keep idle worker processes a while: Ray Data starts a read task per chunk each epoch, and
             # starting a fresh Python process for each costs more CPU than a small machine can spare.
             _system_config={"idle_worker_killing_time_threshold_ms": 60_000, "num_workers_soft_limit": 64})
    return True


def fit(cfg: Config, train_loop: Callable[[dict], None], loop_config: dict,
        make_datasets: Callable[[dict], dict], split: tuple[str, ...] = ("train",),
        services: Optional[Callable[[], contextlib.AbstractContextManager]] = None, callbacks: tuple = ()):
    """One Ray Train run of `train_loop` on `cfg.ray`'s workers; checkpoints under <run>/ray_train.

    `services()`, entered once Ray is up, yields a dict of handles (e.g. the synthesis pool) that is
    merged into the loop config and given to `make_datasets`; it is exited (and so stopped) whatever
    happens. The same run resumes from its last checkpoint. Returns Ray Train's Result.
    """
    import ray

    started_ray = init_ray(cfg)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        with (services() if services else contextlib.nullcontext({})) as handles:
            return _fit(cfg, train_loop, {**loop_config, **handles}, make_datasets(handles), split, callbacks)
    finally:
        if started_ray:
            ray.shutdown()


def _fit(cfg, train_loop, loop_config, datasets, split, callbacks):
    import ray.train
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
            resources_per_worker={"CPU": cfg.ray.cpus_per_worker, **cfg.ray.resources_per_worker}),
        run_config=ray.train.RunConfig(
            name=storage.CHECKPOINTS, storage_path=cfg.run_location,  # a URI: checkpoints go straight there
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            # Workers' prints go straight to the console, not once more through Train's logger.
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
            callbacks=list(callbacks)),
        datasets=datasets,
        # No shard locality: with it, Ray Data holds back blocks that have no node location (small
        # ones live in their owner's memory, like the synthetic chunks of a small image size) until
        # its buffer is full or the stream ends, which would push the chunks to the end of the epoch.
        dataset_config=ray.train.DataConfig(datasets_to_split=list(split), enable_shard_locality=False),
    )
    return trainer.fit()


def shared_diffusion_model(cfg: Config, loaded: Optional[dict] = None) -> Config:
    """`cfg` with diffusion.model_dir set when it synthesises: the model every trial of a search or
    benchmark shares, pretrained here (once, before any trial starts) if it does not exist yet, and
    checked against the run's validation and test images before any trial starts. `loaded` keeps the
    last split loaded, so that consecutive runs with the same data and split seed load it once."""
    if cfg.synthesis.mode == "none":
        return cfg
    from ioisray.recipes.train import diffusion_model

    loaded = {} if loaded is None else loaded
    key = (cfg.data.model_dump_json(), cfg.split_seed)
    if key not in loaded:
        loaded.clear()
        loaded[key] = setup_data(cfg)
    model_dir = diffusion_model(cfg, *loaded[key])
    return cfg.model_copy(update={"diffusion": cfg.diffusion.model_copy(update={"model_dir": model_dir})})


def run_trials(cfg: Config, trainable, param_space: dict, per_trial: dict[str, float], *, name: str,
               limit: Optional[int], max_failures: int, metric: Optional[str] = None, search_seed: int = 0,
               **tune_config):
    """Run `trainable` as Ray Tune trials over `param_space`, on the Ray of `cfg.ray` (started here if
    needed), never more at once than the cluster's resources hold (`per_trial` each, see
    experiments.trial_resources): a trial never waits for CPUs or GPUs another one holds.
    Tune's own records go to <run>/<name>_<time>. Returns Tune's ResultGrid."""
    import ray
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from ioisray.experiments import max_concurrent_trials

    started_ray = init_ray(cfg)
    try:
        concurrent = max_concurrent_trials(ray.cluster_resources(), per_trial, limit)
        print(f"[ioisray] {name}: each trial holds {per_trial}; {concurrent} at a time on this cluster "
              f"({ {k: v for k, v in ray.cluster_resources().items() if k in per_trial} })", flush=True)
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"cpu": 0.1}),  # the trial's own driver; its runs ask for the rest
            param_space=param_space,
            # The variant generator itself holds the limit (TuneConfig's is ignored next to a search_alg).
            tune_config=tune.TuneConfig(search_alg=BasicVariantGenerator(max_concurrent=concurrent,
                                                                         random_state=search_seed),
                                        metric=metric, mode="max" if metric else None, **tune_config),
            run_config=tune.RunConfig(name=f"{name}_{time.strftime('%Y%m%d-%H%M%S')}", storage_path=cfg.run_location,
                                      failure_config=tune.FailureConfig(max_failures=max_failures), verbose=1))
        return tuner.fit()
    finally:
        if started_ray:
            ray.shutdown()


# ---------------------------------------------------------------------------------------------
# Worker side


def worker_setup(cfg: Config):
    """Per-worker basics: (rank, world size, device); quiet Ray Train's per-report INFO lines; CUDA
    settings, with this worker's memory capped to its share of a GPU it shares (ray.resources_per_worker)."""
    import logging

    import ray.train
    import ray.train.torch
    import torch

    from ioisray.precision import configure_device

    logging.getLogger("ray.train").setLevel(logging.WARNING)
    torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    configure_device(device, cfg.ray.resources_per_worker.get("GPU", 1.0) if cfg.ray.use_gpu else 1.0)
    return ctx.get_world_rank(), ctx.get_world_size(), device


def cpu_batches(device) -> dict:
    """iter_torch_batches options: batches stay on the CPU (pinned when training on a GPU, so they move
    without blocking) with two prefetched, and the training loop moves what it needs. Ray's default,
    device="auto", would put them on the GPU, and every look at a metadata column (is it synthetic?
    which epoch?) would then wait for the GPU."""
    return {"device": "cpu", "pin_memory": getattr(device, "type", "cpu") == "cuda", "prefetch_batches": 2}


def restore_or_start(cfg: Config, model, optimizer, scheduler) -> tuple[TrainingState, bool]:
    """The run's latest checkpoint loaded into model, optimizer and scheduler, or a fresh state.

    Returns (state, resumed); method state (EMA, AAS, ...) is in `state.extra` for the caller.
    """
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return TrainingState(epoch=0, model={}, optimizer={}, scheduler={}, seed=cfg.seed), False
    with checkpoint.as_directory() as d:
        state = TrainingState.load(d)
    model.load_state_dict(state.model)
    optimizer.load_state_dict(state.optimizer)
    scheduler.load_state_dict(state.scheduler)
    return state, True


def epoch_generator(cfg: Config, rank: int, epoch: int):
    """This worker's random stream for one epoch, from (seed, rank, epoch): a resumed run replays it.

    Also reseeds torch's global RNG (used by augmentation and noise draws) from the same stream.
    """
    import torch

    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + rank * 7919 + epoch)
    torch.manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
    return gen


def report(metrics: dict, checkpoint_dir: Optional[str]) -> None:
    """Every rank reports (Ray Train needs equal counts); rank 0 passes the checkpoint folder."""
    import ray.train

    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir)
                     if checkpoint_dir else None, delete_local_checkpoint_after_upload=True)


def new_checkpoint_dir() -> str:
    return tempfile.mkdtemp(prefix="ioisray-ckpt-")


def cpu_state_dict(model) -> dict:
    """The bare module's weights as CPU tensors of their own (training may go on changing the live ones)."""
    return {k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}


def unwrap(model):
    """The bare module inside DDP: a forward on one rank alone must not wait for the others."""
    return model.module if hasattr(model, "module") else model
