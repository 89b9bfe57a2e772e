"""Recipe: `ioisray benchmark`, methods x seeds (x datasets) compared on the test split.

    setup    driver: expand `benchmark` into run configs named <name>[_<dataset>]_<method>_s<seed>, each an
             ordinary `ioisray train` run in output_dir; leave out the runs that have finished (rerunning
             skips them, and resumes an interrupted one from its checkpoint); pretrain the diffusion models
             the synthesis methods need, once per dataset and seed, before any trial starts
    train    the unfinished runs as Ray Tune trials, as many at once as the cluster holds, so a grid spreads
             over a cluster; a failed run is retried from its last checkpoint
    save     <output_dir>/<name>/: results.md and results.csv (mean and std over seeds of accuracy, balanced
             accuracy, macro-F1, MCC, AUC and per-class accuracy), the per-class accuracy change of each
             method against `benchmark.baseline`, a real-vs-synthetic grid per synthesis method, and
             paired.csv: each method's balanced-accuracy and macro-F1 difference from the baseline (and
             `benchmark.compare` pairs) on the same test images, with a 95% bootstrap interval
    cleanup  stop the Ray this process started
"""
from __future__ import annotations

import csv
import json

import numpy as np

from ioisray import report as figures, storage
from ioisray.atomic import atomic_write_bytes, atomic_write_text
from ioisray.config import Config, save_config, with_absolute_paths
from ioisray.experiments import (aggregate, benchmark_runs, comparisons, paired_markdown, paired_rows, results_csv,
                                 results_markdown, trial_resources)
from ioisray.recipes.launch import run_trials
from ioisray.recipes.prerequisites import shared_diffusion_model
from ioisray.run import Run, run_dir, run_location


def benchmark_trial(params: dict, *, configs: dict[str, dict]) -> None:
    """One run of the grid: `ioisray train` of its config (the test split once, at its end)."""
    from ioisray.config import RunFinishedError
    from ioisray.recipes.train import train

    try:
        train(Config.model_validate(configs[params["run"]]))
    except RunFinishedError:  # a retry of a run that had finished just before its trial failed
        pass


def _finished(cfg: Config) -> dict | None:
    path = Run(cfg).pull().dir / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None


class NothingFinishedError(RuntimeError):
    """No run of the grid has results to tabulate."""


def benchmark(cfg: Config, report_only: bool = False) -> dict:
    """Run the grid (with `report_only`, only tabulate the runs that have finished); returns
    {"table", "figures", "missing", "run_dir"}."""
    cfg = with_absolute_paths(cfg)  # trials run in working folders of their own
    runs = benchmark_runs(cfg)
    todo = [r for r in runs if _finished(r.config) is None]
    print(f"[ioisray] benchmark {cfg.name}: {len(runs)} runs, {len(runs) - len(todo)} finished already, "
          f"{len(todo)} to run" + (" (not now: --report-only)" if report_only and todo else ""), flush=True)
    if todo and not report_only:
        from ray import tune

        # Grouped by split, so that each split's data is loaded once to check (or pretrain) its model.
        loaded: dict = {}
        ready = {r.name: shared_diffusion_model(r.config, loaded)
                 for r in sorted(todo, key=lambda r: (r.config.data.model_dump_json(), r.config.split_seed))}
        loaded.clear()
        configs = {r.name: ready[r.name] for r in todo}
        per_trial = {}
        for c in configs.values():  # the largest need of any run, per resource
            for k, v in trial_resources(c).items():
                per_trial[k] = max(per_trial.get(k, 0.0), v)
        trainable = tune.with_parameters(benchmark_trial, configs={k: c.model_dump(mode="json")
                                                                   for k, c in configs.items()})
        run_trials(cfg, trainable, {"run": tune.grid_search(list(configs))}, per_trial, name="benchmark",
                   limit=cfg.benchmark.max_concurrent_trials, max_failures=cfg.benchmark.max_failures)

    results = {r.name: m for r in runs if (m := _finished(r.config)) is not None}
    missing = [r.name for r in runs if r.name not in results]
    if not results:  # before anything is written: a failed report leaves no folder behind
        raise NothingFinishedError(f"no run of benchmark {cfg.name} has finished in {cfg.output_dir}"
                                   + (" (run it without --report-only)" if report_only else ""))
    out_dir = Run(cfg).pull().dir
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    tables, made = [], []
    for dataset in dict.fromkeys(r.dataset for r in runs):
        group_of = {r.name: r.method for r in runs if r.dataset == dataset}
        rows = aggregate(results, group_of)
        if not rows:
            continue
        prefix = f"{dataset}_" if dataset else ""
        title = f"### {dataset}" if dataset else ""
        paired = _paired(cfg, [r for r in runs if r.dataset == dataset], results)
        tables.append((results_markdown(rows, title) + (f"\n{paired_markdown(paired)}" if paired else ""),
                       {"results.csv": results_csv(rows), **({"paired.csv": results_csv(paired)} if paired else {})},
                       prefix))
        made += _figures(cfg, [r for r in runs if r.dataset == dataset], results, out_dir, prefix)
    seeds_note = f"Test split, mean ± std over seeds {cfg.benchmark.seeds}; runs in {cfg.output_dir}.\n\n"
    atomic_write_text(out_dir / "results.md", seeds_note + "\n".join(t[0] for t in tables))
    for _, csv_files, prefix in tables:
        for name, text in csv_files.items():
            atomic_write_text(out_dir / f"{prefix}{name}", text)
        if "paired.csv" not in csv_files:  # not an earlier report's numbers next to this one's table
            (out_dir / f"{prefix}paired.csv").unlink(missing_ok=True)
            if storage.is_uri(cfg.output_dir):
                storage.delete(storage.join(run_location(cfg), f"{prefix}paired.csv"))
    storage.push(out_dir, run_location(cfg))
    return {"table": (out_dir / "results.md").read_text(), "missing": missing, "run_dir": run_location(cfg),
            "figures": [storage.join(run_location(cfg), p.name) for p in made]}


def _paired(cfg: Config, runs, results: dict) -> list[dict]:
    """experiments.paired_rows over the finished runs' test predictions (each run's test_predictions.csv,
    row i = image i of the test split); none when the runs were not all tested on the same images."""
    from ioisray.recipes.train import TEST_PREDICTIONS_FILE

    predictions, names, test_splits, left_out = {}, None, set(), []
    for r in runs:
        path, m = run_dir(r.config) / TEST_PREDICTIONS_FILE, results.get(r.name)
        if m is None or not path.is_file():
            continue
        if not m.get("test_predictions_in_split_order"):  # finished before evaluation read its split in order
            left_out.append(r.name)
            continue
        names = m["class_names"]
        index = {n: i for i, n in enumerate(names)}
        try:
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
            predictions[(r.method, r.seed)] = (np.array([index[row["label"]] for row in rows]),
                                               np.array([index[row["predicted"]] for row in rows]))
        except (KeyError, ValueError, UnicodeDecodeError) as e:
            print(f"[ioisray] warning: {path} is not a predictions file of this run's classes ({e!r}): "
                  f"{r.name} left out of the paired differences", flush=True)
            continue
        test_splits.add(m.get("split_ids", {}).get("test"))
    if left_out:
        print(f"[ioisray] warning: {', '.join(left_out)} finished before test predictions were written in the "
              f"split's order: left out of the paired differences", flush=True)
    if len(test_splits) > 1 or len({y.tobytes() for y, _ in predictions.values()}) > 1:
        print("[ioisray] warning: the runs were not tested on the same images (another data.split_seed or "
              "split?): no paired differences", flush=True)
        return []
    b = cfg.benchmark
    unknown = sorted({m for pair in b.compare for m in pair} - set(b.methods))
    if unknown:
        print(f"[ioisray] benchmark.compare names methods that are not in benchmark.methods: {unknown} "
              f"(their pairs are left out)", flush=True)
    return paired_rows(predictions, comparisons(list(b.methods), b.baseline, b.compare), len(names)) if names else []


def _figures(cfg: Config, runs, results: dict, out_dir, prefix: str) -> list:
    """Per-class accuracy change of every method's mean against the baseline method's mean (the paper's
    Figure 2), and the real-vs-synthetic grid of the first seed of each synthesis method (Figure 3)."""
    made = []
    by_method: dict[str, list[dict]] = {}
    for r in runs:
        if r.name in results:
            by_method.setdefault(r.method, []).append(results[r.name])
    base = cfg.benchmark.baseline
    if base in by_method:
        names = by_method[base][0]["class_names"]
        mean_acc = {m: np.mean([[x["test"]["per_class_accuracy"][n] for n in names] for x in rs], axis=0)
                    for m, rs in by_method.items()}
        bacc = {m: np.mean([x["test"]["balanced_accuracy"] for x in rs]) for m, rs in by_method.items()}
        for m in by_method:
            if m != base:
                title = (f"{m} vs {base}, mean of {len(by_method[m])} vs {len(by_method[base])} seeds: "
                         f"test BACC {bacc[m]:.3f} vs {bacc[base]:.3f}")
                made.append(figures.per_class_change(names, mean_acc[m], mean_acc[base],
                                                     out_dir / f"{prefix}per_class_change_{m}_vs_{base}.png", title))
    for m in by_method:
        first = next(r for r in runs if r.method == m and r.name in results)
        src = run_dir(first.config) / figures.REAL_VS_SYNTHETIC_PNG
        if src.is_file():
            made.append(out_dir / f"{prefix}real_vs_synthetic_{m}.png")
            atomic_write_bytes(made[-1], src.read_bytes())
    return made
