"""Starting Ray, and running a recipe's workers on it: one Ray Train fit, or many as Ray Tune trials."""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from typing import Callable, Optional

from ioisray import pymp, sigterm, storage, supervisor
from ioisray.config import Config
from ioisray.recipes.console import (RAY_DATA_LOGGING, drop_raylet_notices, quiet_data_context, quiet_ray_data,
                                     quiet_auth_notice, quiet_tune, verbose as verbose_asked)
from ioisray.run import RunInterrupted, run_location


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


# The local object store: at least Ray's former fixed size here, at most Ray's own default share of the
# machine's memory (Linux's /dev/shm, where the store lives, is half of it by default).
OBJECT_STORE_FLOOR_BYTES = 512 * 2**20
OBJECT_STORE_MEMORY_SHARE = 0.3


def local_object_store_bytes(cfg: Config, data_bytes: int = 0, system_bytes: Optional[int] = None) -> int:
    """The object store of a private local Ray: `ray.object_store_mb` when set, else twice what a run keeps
    there (`data_bytes` of images, every split put once, and an epoch's synthetic images, kept until the
    next epoch's plan), since Ray Data's blocks in flight are copies of those rows, within
    [OBJECT_STORE_FLOOR_BYTES, OBJECT_STORE_MEMORY_SHARE of the machine's memory]. A store smaller than
    the data spills it to disk and reads it back for every epoch."""
    if cfg.ray.object_store_mb is not None:
        return cfg.ray.object_store_mb * 2**20
    s = cfg.synthesis
    # A run resolves budget=balance to a number before its Ray starts (iois.resolve_budget); a search's
    # Ray, started before any split is loaded, counts its cap.
    budget = s.budget if isinstance(s.budget, int) else (s.max_budget or 0)
    synthetic = budget * cfg.data.image_size ** 2 * 3 if s.mode != "none" else 0
    cap = int(OBJECT_STORE_MEMORY_SHARE * (system_bytes or _system_memory()))
    return max(OBJECT_STORE_FLOOR_BYTES, min(2 * (int(data_bytes) + synthetic), cap))


def _system_memory() -> int:
    try:
        from ray._common.utils import get_system_memory  # a container's memory limit included
    except ImportError:  # another Ray
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(get_system_memory())


# Ray Train extras that cost a process or a thread per run and serve nothing on one machine: the
# watcher of spot-node preemption (an actor) and its metrics exporters (metrics collection is off).
# Its controller polls the workers every 2 s by default, and a run's start and end each wait for polls:
# 0.2 s took 4-5 s off every fit on 2 cores (12-14 s to 7-9 s for a no-op loop), for a poll that costs
# one small actor call per worker.
LOCAL_RAY_TRAIN = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_METRICS_ENABLED": "0",
                   "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}


# Ray's settings for the private local Ray. Idle worker processes are kept a while: Ray Data starts a read
# task per chunk each epoch, and a fresh Python process for each costs more CPU than a small machine can
# spare (Ray's default ends an idle worker after 1 s). ray.init adds its session's spilling folder to the
# dict it is given: each start gets a copy, or the next Ray of the process would spill into the last one's.
LOCAL_RAY_SYSTEM = {"idle_worker_killing_time_threshold_ms": 60_000, "num_workers_soft_limit": 64,
                    "enable_metrics_collection": False}


# Ray's switch for a Ray that is one machine only (its default on macOS and Windows): the node's IP is
# 127.0.0.1, so the servers that bind to all interfaces unless the node is local (the Prometheus
# endpoints of the dashboard and of the autoscaler monitor) bind to loopback.
LOCAL_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _local_only() -> None:
    """Make the Ray about to start in this process a loopback-only one (see LOCAL_ONLY): in this process
    (Ray read the variable when it was imported) and in every process it starts."""
    from ray._private import ray_constants

    os.environ[LOCAL_ONLY] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def _stop_data_executors(timeout: float = 10.0) -> None:
    """Stop the Ray Data executions still running in this process (a loop stopped by Ctrl-C leaves its
    dataset's executor thread behind), and wait for them: one that is still running when Ray shuts
    down touches the shut-down Ray, and Ray then ends the whole process before it can say anything."""
    for thread in threading.enumerate():
        if type(thread).__name__ == "StreamingExecutor" and thread.is_alive():
            try:
                thread.shutdown(force=True)
            except Exception:  # noqa: BLE001 - it is being torn down anyway; waiting is what matters
                pass
            thread.join(timeout)


def _start_autoscaling_coordinator() -> None:
    """Start the actor Ray Train and Ray Data send their resource requests to, and wait until it
    answers. Otherwise the first Train run starts it, and on a small machine its first request times
    out while the actor's process starts, which Ray Train reports with a traceback (harmless)."""
    import ray

    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )
    except ImportError:  # another Ray: at worst that traceback
        return
    ray.get(get_or_create_autoscaling_coordinator().get_reserved_resources.remote("ioisray"))


class RayDidNotStart(Exception):
    """The local Ray did not come up within ray.start_timeout_s; the message says why and what to do."""


class _RayletExited(Exception):
    """The raylet of a starting Ray exited (it gives its agents 15 s to come up, a limit no setting
    changes, and on a busy machine their imports alone can take longer): Ray is started again."""


def _did_not_start(seconds: float) -> RayDidNotStart:
    return RayDidNotStart(
        f"Ray did not start within {seconds:g} s (ray.start_timeout_s): its processes start slowly when the "
        f"machine is busy (other jobs on its CPUs, little free memory, a slow disk under its temporary folder), "
        f"and its raylet gives up on its agents after 15 s; rerun when the machine is less busy, or give Ray "
        f"longer, e.g. ray.start_timeout_s={max(2 * seconds, 300):g}. Nothing of the run was lost: the same "
        f"command resumes it")


# Ray's own limits on how long a starting node may take, raised (never lowered) to ray.start_timeout_s:
# how long the driver and the GCS wait for the raylet to register, and how long the raylet waits for
# its agents to register. Each with the factor from seconds to its unit.
START_WAITS = {"RAY_raylet_start_wait_time_s": 1, "RAY_agent_register_timeout_ms": 1000}
RAY_START_WAIT_DEFAULT_S = 30


def _init_local_ray(seconds: float, init: Callable[[], None]) -> None:
    """init() (ray.init of a local Ray), given `seconds` to come up; started again while time is left
    when its raylet exits during start-up (_RayletExited), as it does when the machine is busy.
    RayDidNotStart past the time."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with _start_within(seconds, deadline):
                init()
            return
        except _RayletExited:
            if time.monotonic() >= deadline:
                raise _did_not_start(seconds) from None
            print("[ioisray] Ray's raylet stopped while starting (its agents were slow to start: a busy "
                  "machine); starting Ray again", flush=True)


@contextlib.contextmanager
def _start_within(seconds: float, deadline: float):
    """ray.init of a local Ray, by `deadline`. Ray's own limits (START_WAITS, and its dashboard's)
    become at least `seconds` for the processes it starts, and its own fixed 30 s for its node to
    register (it asks the GCS in a loop it ends after 30 s) becomes the deadline; the deadline is also
    checked before the dashboard and the raylet start. Past it (or once the raylet has exited) the
    processes started so far are stopped and RayDidNotStart (or _RayletExited) is raised."""
    from ray._private import ray_constants, services

    def check(caller) -> None:
        node = caller.f_locals.get("self")
        raylet_gone = any(kind == ray_constants.PROCESS_TYPE_RAYLET for kind, _ in _dead_processes(node))
        if raylet_gone or time.monotonic() > deadline:
            _stop_half_started(node)
            raise _RayletExited() if raylet_gone else _did_not_start(seconds)

    def by_the_deadline(start):
        def started(*args, **kwargs):
            check(sys._getframe(1))
            return start(*args, **kwargs)

        return started

    def get_node_by_the_deadline(gcs_address, node_id):
        while True:
            check(sys._getframe(1))
            try:
                return original["get_node"](gcs_address, node_id)
            except RuntimeError:  # not registered yet
                time.sleep(0.1)

    original = {name: getattr(services, name) for name in ("get_node", "start_api_server", "start_raylet")}
    dashboard_wait = ray_constants.RAY_DASHBOARD_STARTUP_TIMEOUT_S
    waits = max(RAY_START_WAIT_DEFAULT_S, math.ceil(seconds))
    env_before = {k: os.environ.get(k) for k in START_WAITS}
    for k, unit in START_WAITS.items():  # read by this process's Ray and inherited by those it starts
        os.environ.setdefault(k, str(waits * unit))
    services.get_node = get_node_by_the_deadline
    services.start_api_server = by_the_deadline(original["start_api_server"])
    services.start_raylet = by_the_deadline(original["start_raylet"])
    ray_constants.RAY_DASHBOARD_STARTUP_TIMEOUT_S = max(dashboard_wait, waits)
    try:
        yield
    except Exception as e:
        if "timed out during startup" in str(e):  # Ray's own limit, should another Ray's start-up differ
            raise _did_not_start(seconds) from None
        raise
    finally:
        for name, function in original.items():
            setattr(services, name, function)
        ray_constants.RAY_DASHBOARD_STARTUP_TIMEOUT_S = dashboard_wait
        _restore_env(env_before)


def _restore_env(before: dict) -> None:
    """The environment variables of `before` back to those values (None: unset)."""
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _dead_processes(node) -> list:
    from ray._private.node import Node

    return node.dead_processes() if isinstance(node, Node) else []


def _stop_half_started(node) -> None:
    """The processes a Ray start-up that is given up has started (its Node is not yet ray's to shut down)."""
    from ray._private.node import Node

    if isinstance(node, Node):
        node.kill_all_processes(check_alive=False, allow_graceful=False)


@contextlib.contextmanager
def _sigterm_as_ctrl_c():
    """ray.init, with SIGTERM still a Ctrl-C (ioisray/sigterm.py): ray.init replaces the handler with one
    that exits at once (SystemExit), and its core worker with one that dumps a stack and aborts; ours is
    put back once Ray is up, and a SIGTERM that came while Ray started stops the command as Ctrl-C does."""
    try:
        yield
    except SystemExit as e:
        if sigterm.installed() and e.code == signal.SIGTERM:
            sigterm.mark_received()
            raise KeyboardInterrupt from None
        raise
    finally:
        sigterm.reinstall()


@contextlib.contextmanager
def ray_session(cfg: Config, verbose: Optional[bool] = None, data_bytes: int = 0):
    """Ray for the block: the cluster `ray.address` names, or a private local Ray, shut down at the end.
    Nested uses (a baseline or a diffusion model made before the run) use the one already up, so a
    job starts Ray once. A local Ray's object store is sized for `data_bytes` of images
    (local_object_store_bytes).

    The local Ray's address is fixed before it starts and given to every process it starts
    (RAY_ADDRESS), so Ray's own helpers never guess among other Ray instances on the host. It is a
    node on 127.0.0.1 (it is local by definition): its dashboard and the Prometheus endpoints of its
    dashboard and autoscaler monitor, which would answer anyone on the network without Ray's token,
    listen on loopback only, and its per-process metrics exporters are off. Logs below WARNING from
    Ray's processes are dropped unless `verbose` (default: `ioisray --verbose`, which sets
    IOISRAY_VERBOSE=1). After a SIGTERM, a local Ray is not shut down but left to end with the command
    (local_ray_ends_with_the_command)."""
    global _OWN_LOCAL_RAY
    import ray

    if ray.is_initialized():  # also in a Tune trial, whose Ray Data settings start from the defaults
        quiet_data_context()
        yield
        return
    if verbose is None:
        verbose = verbose_asked()
    level = "INFO" if verbose else "WARNING"
    env_before = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT", RAY_DATA_LOGGING,
                                                  "PYTHONWARNINGS", LOCAL_ONLY, *LOCAL_RAY_TRAIN)}
    from ray._private import ray_constants

    cluster_before = ray_constants.ENABLE_RAY_CLUSTER
    mp_before = pymp.folders()
    if not verbose:
        quiet_ray_data()
        quiet_auth_notice()
    try:
        with _sigterm_as_ctrl_c():
            if cfg.ray.address:
                ray.init(address=cfg.ray.address, logging_level=level,
                         logging_config=ray.LoggingConfig(log_level=level))
            else:
                port = _free_port()
                os.environ["RAY_GCS_SERVER_PORT"] = str(port)
                for k, v in LOCAL_RAY_TRAIN.items():
                    os.environ.setdefault(k, v)
                os.environ["RAY_ADDRESS"] = f"127.0.0.1:{port}"  # see _local_only
                _local_only()
                _init_local_ray(cfg.ray.start_timeout_s, lambda: ray.init(
                    address="local", num_cpus=local_ray_cpus(cfg),
                    object_store_memory=local_object_store_bytes(cfg, data_bytes), dashboard_host="127.0.0.1",
                    logging_level=level, logging_config=ray.LoggingConfig(log_level=level),
                    _system_config=dict(LOCAL_RAY_SYSTEM)))
        _OWN_LOCAL_RAY = not cfg.ray.address
        if not verbose:
            drop_raylet_notices()
        _start_autoscaling_coordinator()
        quiet_data_context()
        yield
    except (KeyboardInterrupt, RunInterrupted):
        # Ray threads cut off by Ctrl-C or SIGTERM log their errors while Ray shuts down; the recipe says
        # what happened. A run inside this session (a job's baseline) turns the stop into RunInterrupted.
        for name in ("ray", "ray.data", "ray.train", "ray.tune"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        if not local_ray_ends_with_the_command():
            _stop_data_executors()
        raise
    finally:
        if local_ray_ends_with_the_command():
            sigterm.end_with_the_command(functools.partial(_end_local_ray, mp_before))
        else:
            ours = {os.path.dirname(p) for p in pymp.listening(children_only=True)}
            ray.shutdown()
            if not cfg.ray.address:
                pymp.remove(ours, pymp.folders() - mp_before)
        _OWN_LOCAL_RAY = False
        ray_constants.ENABLE_RAY_CLUSTER = cluster_before
        _restore_env(env_before)


# Whether a ray_session of this process holds a local Ray it started.
_OWN_LOCAL_RAY = False


def local_ray_ends_with_the_command() -> bool:
    """Whether the local Ray this process started is left to end with the command rather than shut down:
    a SIGTERM stopped the command, and Ray's client would end it, silently, at its first touch of a Ray
    that the same SIGTERM ended (ioisray/sigterm.py). Nothing then waits on that Ray: not the synthesis
    pool, not Ray Data's executors, not ray.shutdown."""
    return _OWN_LOCAL_RAY and sigterm.installed() and sigterm.received()


def _end_local_ray(mp_before: set[str]) -> None:
    """End the processes of the local Ray this process started, without waiting for them (what they
    started ends with them: Ray's workers exit when their raylet is gone), and remove the multiprocessing
    folders they listened in."""
    import ray._private.worker as ray_worker

    ours = {os.path.dirname(p) for p in pymp.listening(children_only=True)}
    node = ray_worker._global_node
    for infos in (node.all_processes.values() if node is not None else ()):
        for info in infos:
            with contextlib.suppress(OSError):
                info.process.kill()
    pymp.remove(ours, pymp.folders() - mp_before)


def fit(cfg: Config, train_loop: Callable[[dict], None], loop_config: dict,
        make_datasets: Callable[[dict], dict], split: tuple[str, ...] = ("train",),
        services: Optional[Callable[[], contextlib.AbstractContextManager]] = None, callbacks: tuple = ()):
    """One Ray Train run of `train_loop` on `cfg.ray`'s workers (`ray.num_workers=0`: in this process,
    without Ray Train).

    `services()`, entered once Ray is up, yields a dict of handles (e.g. the synthesis pool) that is
    merged into the loop config and given to `make_datasets`; it is exited (and so stopped) whatever
    happens. A worker that dies restarts the workers from the run's last checkpoint, up to
    `train.max_failures` times (the loop resumes from its own checkpoints, see recipes/worker.py).
    Returns Ray Train's Result (None for a loop run in this process).
    """
    from ioisray import cluster

    with ray_session(cfg):
        # Before anything starts: the paths every node uses, and workers the cluster can place at all
        # (Ray Train would otherwise wait for them forever). The synthesis pool checks itself with them.
        capacity = cluster.capacity(cfg)
        cluster.check_shared_paths(cfg, capacity)
        cluster.check_fits([cluster.trainer_request(cfg)], capacity)
        with services() if services else contextlib.nullcontext({}) as handles:
            return _fit(cfg, train_loop, {**loop_config, **handles}, make_datasets(handles), split, callbacks)


# The run whose loop runs in this process, without Ray Train (`ray.num_workers=0`, _fit):
# its datasets, read whole, and the Ray Train callbacks its epoch reports go to. Ray Train's own
# in-process mode is not used: it calls no callbacks, and it refuses to run inside a Ray Tune trial, so
# a search's trials could not train in their own process.
_IN_PROCESS: Optional[dict] = None


@contextlib.contextmanager
def in_process(datasets: dict, callbacks: tuple = ()):
    """Run a training loop in this process for the block: its `Worker` (recipes/worker.py) reads
    `datasets` and hands each epoch's report to `callbacks` (`after_report`, as Ray Train calls them for
    remote workers)."""
    global _IN_PROCESS
    _IN_PROCESS = {"datasets": datasets, "callbacks": callbacks}
    try:
        yield
    finally:
        _IN_PROCESS = None


def in_process_run() -> Optional[dict]:
    """The run whose loop runs in this process ({"datasets", "callbacks"}), or None (a Ray Train worker)."""
    return _IN_PROCESS


def _fit(cfg, train_loop, loop_config, datasets, split, callbacks):
    if cfg.ray.num_workers == 0:  # the loop in this process, without Ray Train (in_process)
        def run_here():
            with in_process(datasets, callbacks):
                train_loop(loop_config)

        return _in_a_thread(run_here, in_process=True)

    import ray.train
    from ray.train.torch import TorchTrainer

    from ioisray.recipes.console import say
    from ioisray.recipes.process_group import NodeAddressTorchConfig

    per_worker = {"CPU": cfg.ray.cpus_per_worker, **({"GPU": 1} if cfg.ray.use_gpu else {}),
                  **cfg.ray.resources_per_worker}
    say(cfg.name, f"starting {cfg.ray.num_workers} Ray Train worker{'s' if cfg.ray.num_workers > 1 else ''} "
                  f"(each {per_worker}); their first lines follow once they have started")
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        torch_config=NodeAddressTorchConfig(),  # its rendezvous listens on the node's address only
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
        dataset_config=train_data_config(datasets, split),
    )
    return _in_a_thread(trainer.fit, in_process=False)


def train_data_config(datasets: dict, split: tuple[str, ...]):
    """How Ray Train hands `datasets` to its workers: those named in `split` divided among them, the others
    (validation, test: rank 0 evaluates them whole) read with their own Ray Data options, so that an
    `ordered` dataset (data/ray_dataset.keep_order) is read in order there too and row i of a prediction
    file is row i of its split."""
    import ray.train

    # No shard locality: with it, Ray Data holds back blocks that have no node location (small
    # ones live in their owner's memory, like the synthetic chunks of a small image size) until
    # its buffer is full or the stream ends, which would push the chunks to the end of the epoch.
    return ray.train.DataConfig(datasets_to_split=list(split), enable_shard_locality=False,
                                execution_options={name: ds.context.execution_options
                                                   for name, ds in datasets.items() if name not in split})


# Set when Ctrl-C reaches the driver: a training loop running in this process (ray.num_workers=0)
# stops at its next batch (recipes/worker.py), so that it is not cut off in the middle of a write.
STOP = threading.Event()


def _in_a_thread(fn, in_process: bool):
    """fn() in a thread of its own, this thread waiting. Ray Train installs a Ctrl-C handler when fit()
    runs in the main thread, and it ends the process from inside the handler, before the recipe can
    say where the run stopped; here Ctrl-C reaches this thread as KeyboardInterrupt. A loop running in
    this process is asked to stop and waited for; remote workers stop when the job's Ray shuts down."""
    out: dict = {}
    # Waited for with an Event, not Thread.join: a join cut short by Ctrl-C can leave the thread looking
    # finished while it runs on (CPython gh-90882), and Ray would be shut down under it.
    finished = threading.Event()

    def target():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread as it is
            out["error"] = e
        finally:
            finished.set()

    STOP.clear()
    threading.Thread(target=target, name="ioisray-fit", daemon=True).start()
    try:
        while not finished.wait(0.5):
            pass
    except KeyboardInterrupt:
        STOP.set()
        if in_process:
            # The loop stops at its next batch. A SIGTERM sent to the whole process group or cgroup (as
            # systemd and Slurm do) stops this Ray's own processes too, and a loop waiting on them then
            # waits until Ray's client ends this process (60 s): it is left behind.
            deadline = time.monotonic() + 60
            while not finished.wait(0.5) and time.monotonic() < deadline and not local_ray_gone():
                pass
            if not finished.is_set():
                _no_new_ray()
        raise
    if "error" in out:
        raise out["error"]
    return out["value"]


def local_ray_gone() -> bool:
    """Whether a process of the local Ray this driver started (its GCS, raylet, ...) has exited."""
    try:
        import ray._private.worker as ray_worker

        node = ray_worker._global_node
        return node is not None and node.head and bool(node.dead_processes())
    except Exception:  # noqa: BLE001 - another Ray: not known, so not gone
        return False


def _no_new_ray() -> None:
    """No Ray started by a thread left behind: a Ray call made after ray.shutdown() starts a new local Ray
    by itself (Ray's auto-init), which this process would then hold."""
    try:
        from ray._private import auto_init_hook
    except ImportError:  # another Ray
        return
    auto_init_hook.enable_auto_connect = False


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

    from ioisray import cluster
    from ioisray.config import ConfigError
    from ioisray.experiments import max_concurrent_trials

    quiet_tune()
    with ray_session(cfg):
        # What the cluster can scale to, not what is up now: an autoscaling cluster shows no GPU node
        # before a request makes the autoscaler add one.
        capacity = cluster.capacity(cfg)
        cluster.check_shared_paths(cfg, capacity)
        try:
            concurrent = max_concurrent_trials(capacity.most, per_trial, limit, has=capacity.has)
        except ConfigError as e:
            if capacity.autoscaler is not None:
                raise
            print(f"[ioisray] warning: {e}; one trial at a time, waiting until the cluster has them", flush=True)
            concurrent = 1
        print(f"[ioisray] {name}: each trial holds {per_trial}; {concurrent} at a time on this cluster, which "
              f"{capacity.has} { {k: v for k, v in capacity.most.items() if k in per_trial} }", flush=True)
        trial_process = _trial_process_resources(cfg)
        if capacity.multi_node and cfg.ray.num_workers:
            # A trial's own process reads what the driver reads (data.root, the baseline): on this node.
            trial_process[f"node:{ray.util.get_node_ip_address()}"] = 0.001
        trainable = tune.with_resources(trainable, trial_process)
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
        stop = f"{name}: the search was interrupted; rerun the same command to resume it"
        before = supervisor.report(run=None, stop=stop)  # what the command's parent says if Ray ends this process
        grid, stopped = _fit_tuner(tuner)
        if stopped:
            raise RunInterrupted(stop)
        supervisor.report(**before)
        return grid


def _trial_process_resources(cfg: Config) -> dict:
    """What a trial's own process holds: its driver's 0.1 CPU (its runs' Ray Train workers ask for the
    rest), plus one worker's share when its runs train in that process (ray.num_workers=0), so that Ray
    gives the process the GPU it trains on."""
    from ioisray.experiments import worker_resources

    if cfg.ray.num_workers:
        return {"CPU": 0.1}
    share = worker_resources(cfg)
    return {**share, "CPU": share["CPU"] + 0.1}


def _fit_tuner(tuner):
    """tuner.fit(), and whether Ctrl-C stopped it. On Ctrl-C Tune stops the trials, saves the search and
    returns as if it had ended; its Ctrl-C handler then puts back the handler it found, which is how a
    stop is told from an end here. SIGTERM goes the same way (ioisray/sigterm.py calls the Ctrl-C handler)."""
    if threading.current_thread() is not threading.main_thread() or os.environ.get("TUNE_DISABLE_SIGINT_HANDLER",
                                                                                     "0") != "0":
        return tuner.fit(), False  # Tune catches no Ctrl-C: it ends the process as usual

    def ours(signum, frame):
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGINT, ours)
    try:
        grid = tuner.fit()
        return grid, signal.getsignal(signal.SIGINT) is ours
    finally:
        signal.signal(signal.SIGINT, before)
