"""Starting Ray, and running a recipe's workers on it: one Ray Train fit, or many as Ray Tune trials."""
from __future__ import annotations

import contextlib
import math
import os
import time
from typing import Callable, Optional

from ioisray import storage
from ioisray.config import Config
from ioisray.run import run_location


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
    """One Ray Train run of `train_loop` on `cfg.ray`'s workers (`ray.num_workers=0`: in this process).

    `services()`, entered once Ray is up, yields a dict of handles (e.g. the synthesis pool) that is
    merged into the loop config and given to `make_datasets`; it is exited (and so stopped) whatever
    happens. A worker that dies restarts the workers from the run's last checkpoint, up to
    `train.max_failures` times (the loop resumes from its own checkpoints, see recipes/worker.py).
    Returns Ray Train's Result.
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
            name=storage.RAY_TRAIN, storage_path=run_location(cfg),  # Ray Train's own records only
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
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
            run_config=tune.RunConfig(name=f"{name}_{time.strftime('%Y%m%d-%H%M%S')}", storage_path=run_location(cfg),
                                      failure_config=tune.FailureConfig(max_failures=max_failures), verbose=1))
        return tuner.fit()
    finally:
        if started_ray:
            ray.shutdown()
