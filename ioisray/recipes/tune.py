"""Recipe: `ioisray tune`, a Ray Tune search over config keys (AAS temperature, synthesis budget, ...).

    setup    driver: check every value the search may try; make what all trials share (the diffusion
             model, pretrained once here if the config names none); start Ray and fit as many trials
             side by side as the cluster's CPUs, GPUs and custom resources hold
    train    one Tune trial per point: an ordinary training run (its own Ray Train workers and synthesis
             pool) that reports its validation metrics every epoch; ASHA stops the weak ones early and a
             failed trial is retried from its last checkpoint. No trial touches the test split.
    save     <run>/trials.csv and trials.md (values, epochs run, best validation metric, status of every
             trial) and <run>/best_config.yaml, a complete config for `ioisray train`
    cleanup  stop the Ray this process started
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from ioisray import storage
from ioisray.atomic import atomic_write_text
from ioisray.config import Config, save_config, to_yaml, with_absolute_paths
from ioisray.experiments import check_search_space, results_csv, trial_config, trial_resources
from ioisray.recipes.launch import run_trials
from ioisray.recipes.prerequisites import shared_diffusion_model
from ioisray.run import Run, run_location

TRIALS = "trials"  # the trials' run folders, inside the search's folder
SEARCH = "tune"  # Tune's own records of the search, inside the search's folder


EPOCHS_DONE = "epochs_done"  # ASHA's time unit: epochs the trial's run has completed


def _epoch_reporter(metric: str):
    """A Ray Train callback that hands rank 0's per-epoch metrics to Tune, with the epochs done as ASHA's
    time unit (Tune's own iteration count starts again when a stopped search is restored, the epochs
    of a resumed run do not); the run's last report, which carries no validation metric, is not passed on."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class EpochReporter(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metric in metrics[0]:
                metrics = [{**m, EPOCHS_DONE: m["epoch"] + 1} for m in metrics]
                super().after_report(run_context, metrics, None)

    return EpochReporter()


def tune_trial(params: dict, *, base: dict, trials_dir: str) -> None:
    """One trial: the base config with this trial's values, trained (test split untouched). A trial run
    again (a failure, or a restored search) resumes its run, once its previous process's hold on it
    is released or has lapsed."""
    import ray.tune

    from ioisray.config import RunFinishedError
    from ioisray.recipes.train import train
    from ioisray.lock import STALE_AFTER_SECONDS

    cfg = trial_config(Config.model_validate(base), params, output_dir=trials_dir,
                       name=f"trial_{ray.tune.get_context().get_trial_id()}")
    metric = base["tune"]["metric"]
    # A search stopped after a trial's last epoch was saved, but before its results were: resumed, the
    # run has no epoch left to train and so reports none.
    trained_every_epoch = Run(cfg).latest_epoch() >= cfg.train.epochs
    try:
        train(cfg, evaluate_test=False, callbacks=(_epoch_reporter(metric),), lock_wait=STALE_AFTER_SECONDS + 10)
    except RunFinishedError:
        # The run finished after Tune last heard from it (the search was stopped meanwhile).
        trained_every_epoch = True
    if trained_every_epoch:
        # Its epochs are reported from its results (again for those Tune has: `search` counts epochs,
        # not reports).
        run = Run(cfg).pull()
        for h in json.loads((run.dir / run.done_file).read_text())["history"]:
            ray.tune.report({**h, EPOCHS_DONE: h["epoch"] + 1})


def _schedulers(cfg: Config):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    t = cfg.tune
    if t.scheduler == "fifo":
        return FIFOScheduler()
    # max_t one past the last epoch: a trial that reaches it finishes its run by itself (stopping it
    # there would kill its Ray Train controller while it shuts down).
    return ASHAScheduler(time_attr=EPOCHS_DONE, max_t=cfg.train.epochs + 1, grace_period=t.grace_period,
                         reduction_factor=t.reduction_factor)


def _param_space(cfg: Config) -> dict:
    from ray import tune

    make = {"grid": tune.grid_search, "choice": tune.choice,
            "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v),
            "randint": lambda v: tune.randint(*v)}
    return {key: make[d.kind](list(getattr(d, d.kind))) for key, d in cfg.tune.search_space.items()}


def search(cfg: Config) -> dict:
    """Run the search; returns {"best_params", "best_value", "best_config", "trials", ...}."""
    from ray import tune

    check_search_space(cfg)
    cfg = with_absolute_paths(cfg)  # trials run in working folders of their own
    base = shared_diffusion_model(cfg.model_copy(update={"baseline": None}))
    run = Run(base).pull()
    run.check_resumable(started=storage.exists(run.uri(SEARCH)))  # a stopped search resumes as it began
    run_dir = run.dir
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(base, run_dir / "config.yaml")
    t = cfg.tune
    trainable = tune.with_parameters(tune_trial, base=base.model_dump(mode="json"),
                                     trials_dir=storage.join(run_location(cfg), TRIALS))
    grid = run_trials(base, trainable, _param_space(base), trial_resources(base), name=SEARCH,
                      limit=t.max_concurrent_trials, max_failures=t.max_failures,
                      metric=t.metric, scheduler=_schedulers(base),
                      search_seed=t.search_seed, num_samples=t.num_samples)

    rows = []
    for r in grid:
        history = r.metrics_dataframe
        values = (history[t.metric].dropna().tolist()
                  if history is not None and t.metric in history else [])
        epochs = int(history[EPOCHS_DONE].max()) if values and EPOCHS_DONE in history else 0
        status = (f"error: {str(r.error).splitlines()[0][:80]}" if r.error else
                  "completed" if epochs >= cfg.train.epochs else "stopped early")
        trial_id = (r.metrics or {}).get("trial_id") or (Path(r.path).name if r.path else "?")
        rows.append({"trial": trial_id,  # its run folder: trials/trial_<id>
                     **{k: r.config.get(k) for k in t.search_space}, "epochs": epochs,
                     f"best_{t.metric}": max(values) if values else math.nan, "status": status})
    if not cfg.train.keep_checkpoints:  # ASHA's stopped trials are never resumed: their checkpoints go
        for row in rows:
            if row["status"] == "stopped early":
                storage.delete(storage.join(run_location(cfg), TRIALS, f"trial_{row['trial']}", storage.CHECKPOINTS))
    scored = [(row[f"best_{t.metric}"], i) for i, row in enumerate(rows) if not math.isnan(row[f"best_{t.metric}"])]
    if not scored:
        raise RuntimeError(f"no trial reported {t.metric}; see the trials' logs under {run_location(cfg)}")
    best_value, best_i = max(scored)
    best_params = {k: rows[best_i][k] for k in t.search_space}
    best = trial_config(base, best_params, name=f"{cfg.name}_best")

    _save_tables(rows, run_dir, t.metric)
    best_yaml = run_dir / "best_config.yaml"
    atomic_write_text(best_yaml, f"# The best trial of `ioisray tune` {cfg.name} ({t.metric} {best_value:.4f} on "
                                 f"validation): {best_params}\n# Train it, and only then test it: ioisray train "
                                 f"{best_yaml.name}\n" + to_yaml(best))
    storage.push(run_dir, run_location(cfg))
    return {"best_params": best_params, "best_value": best_value, "trials": rows,
            "best_config": storage.join(run_location(cfg), best_yaml.name), "run_dir": run_location(cfg)}


def _save_tables(rows: list[dict], run_dir: Path, metric: str) -> None:
    atomic_write_text(run_dir / "trials.csv", results_csv(rows))
    ordered = sorted(rows, key=lambda r: -r[f"best_{metric}"] if not math.isnan(r[f"best_{metric}"]) else math.inf)
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in ordered:
        lines.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    atomic_write_text(run_dir / "trials.md", "\n".join(lines) + "\n")
