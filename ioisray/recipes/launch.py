"""Starting Ray, and running a recipe's workers on it: one Ray Train fit, or many as Ray Tune trials."""
from __future__ import annotations

import contextlib
import math
import os
import socket
from typing import Callable, Optional

from ioisray import storage
from ioisray.config import Config
from ioisray.run import run_location


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def local_ray_cpus(cfg: Config) -> int:
    """Logical CPUs for a private local Ray: at least what one run of `cfg` holds (its workers, its
    synthesis actors, room for Ray Data's reads), and twice the cores, so that Ray Data's read tasks find
    a CPU beside the training workers, which otherwise wait for one forever on a small machine."""
    from ioisray.experiments import trial_resources

    needed = math.ceil(trial_resources(cfg.model_copy(update={"ray": cfg.ray.model_copy(update={
        "num_workers": max(1, cfg.ray.num_workers)})}))["CPU"])
    return cfg.ray.local_num_cpus or max(2 * (os.cpu_count() or 1), needed)


@contextlib.contextmanager
def ray_session(cfg: Config, verbose: Optional[bool] = None):
    """Ray for the block: the cluster `ray.address` names, or a private local Ray, shut down at the end.
    Nested sessions (a baseline or a diffusion model made before the run) use the one already up, so a
    job starts Ray once.

    The local Ray's address is fixed before it starts and given to every process it starts
    (RAY_ADDRESS), so Ray's own helpers never guess among other Ray instances on the host; its
    dashboard listens on loopback only, and its Prometheus exporters, which answer anyone on the
    network without Ray's token, are off. Logs below WARNING from Ray's processes are dropped unless
    `verbose` (default: `ioisray --verbose`, which sets IOISRAY_VERBOSE=1)."""
    import ray

    if ray.is_initialized():
        yield
        return
    if verbose is None:
        verbose = os.environ.get("IOISRAY_VERBOSE") == "1"
    level = "INFO" if verbose else "WARNING"
    env_before = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
    try:
        if cfg.ray.address:
            ray.init(address=cfg.ray.address, logging_level=level, logging_config=ray.LoggingConfig(log_level=level))
        else:
            from ray._private.services import get_node_ip_address

            port = _free_port()
            os.environ["RAY_GCS_SERVER_PORT"] = str(port)
            os.environ["RAY_ADDRESS"] = f"{get_node_ip_address()}:{port}"
            ray.init(address="local", num_cpus=local_ray_cpus(cfg), object_store_memory=cfg.ray.object_store_mb * 2**20,
                     dashboard_host="127.0.0.1", logging_level=level, logging_config=ray.LoggingConfig(log_level=level),
                     # Keep idle worker processes a while: Ray Data starts a read task per chunk each epoch,
                     # and a fresh Python process for each costs more CPU than a small machine can spare.
                     _system_config={"idle_worker_killing_time_threshold_ms": 60_000, "num_workers_soft_limit": 64,
                                     "enable_metrics_collection": False})
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        yield
    finally:
        ray.shutdown()
        for k, v in env_before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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
    with ray_session(cfg), (services() if services else contextlib.nullcontext({})) as handles:
        return _fit(cfg, train_loop, {**loop_config, **handles}, make_datasets(handles), split, callbacks)


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
    Tune's own records go to <run>/<name>; when they are there (a search that was stopped), Tune
    restores it: finished trials are kept, unfinished ones resume. Returns Tune's ResultGrid."""
    import ray
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from ioisray.experiments import max_concurrent_trials

    with ray_session(cfg):
        concurrent = max_concurrent_trials(ray.cluster_resources(), per_trial, limit)
        print(f"[ioisray] {name}: each trial holds {per_trial}; {concurrent} at a time on this cluster "
              f"({ {k: v for k, v in ray.cluster_resources().items() if k in per_trial} })", flush=True)
        trainable = tune.with_resources(trainable, {"cpu": 0.1})  # the trial's driver; its runs ask for the rest
        path = storage.join(run_location(cfg), name)
        if tune.Tuner.can_restore(path):
            print(f"[ioisray] {name}: resuming the search in {path}", flush=True)
            tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable, param_space=param_space,
                # The variant generator itself holds the limit (TuneConfig's is ignored next to a search_alg).
                tune_config=tune.TuneConfig(search_alg=BasicVariantGenerator(max_concurrent=concurrent,
                                                                             random_state=search_seed),
                                            metric=metric, mode="max" if metric else None, **tune_config),
                run_config=tune.RunConfig(name=name, storage_path=run_location(cfg), verbose=0,
                                          failure_config=tune.FailureConfig(max_failures=max_failures)))
        return tuner.fit()
