"""Many runs of one config: the trial configs of a search (`ioisray tune`) and of a methods x seeds grid
(`ioisray benchmark`), what one trial holds on the cluster, and the tables that aggregate finished runs.

Plain Python: the recipes in recipes/tune.py and recipes/benchmark.py hand these to Ray Tune.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from ioisray.config import Config, ConfigError, apply_overrides, build_config
from ioisray.metrics import PAIRED_KEYS, SUMMARY_KEYS, paired_bootstrap

# ---------------------------------------------------------------------------------------------
# Trial configs


def _set(raw: dict, key: str, value: Any) -> None:
    node = raw
    *parents, leaf = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value


def trial_config(base: Config, params: dict[str, Any], **top: Any) -> Config:
    """`base` with the dotted `params` set (and top-level keys such as name, output_dir, seed), as a run
    of its own: without the search and grid sections."""
    raw = base.model_dump(mode="json")
    for key, value in params.items():
        _set(raw, key, value)
    raw.update(top)
    raw.pop("tune", None)
    raw.pop("benchmark", None)
    return build_config(raw, source=f"{base.name} with {params}")


UNSEARCHABLE = ("name", "output_dir", "seed", "data", "diffusion", "pretrain", "tune", "benchmark")


def check_search_space(cfg: Config) -> None:
    """Every value a search may try must make a valid config: fail before any trial starts."""
    if not cfg.tune.search_space:
        raise ConfigError("tune.search_space is empty: name at least one config key to search, e.g. "
                          "tune.search_space={aas.temperature: {grid: [0.5, 1, 2]}}")
    for key, dim in cfg.tune.search_space.items():
        if key.split(".")[0] in UNSEARCHABLE:
            raise ConfigError(f"tune.search_space: {key!r} cannot be searched: all trials share the run's name, "
                              f"output_dir, data split and diffusion model (compare seeds with `ioisray benchmark`)")
        for value in dim.candidates():
            try:
                trial_config(cfg, {key: value})
            except ConfigError as e:
                raise ConfigError(f"tune.search_space.{key}: the value {value!r} makes an invalid config:\n{e}") from None


@dataclass(frozen=True)
class BenchmarkRun:
    name: str  # <config name>[_<dataset>]_<method>_s<seed>: the run folder under output_dir
    dataset: str | None
    method: str
    seed: int
    config: Config


def benchmark_runs(cfg: Config) -> list[BenchmarkRun]:
    """The grid of `cfg.benchmark`, in order dataset, method, seed; each a complete run config."""
    b = cfg.benchmark
    if not b.methods:
        raise ConfigError("benchmark.methods is empty: give method names with their overrides, e.g. "
                          "benchmark.methods={ce: [method.loss=ce], iois: [synthesis.mode=online]}")
    base = cfg.model_dump(mode="json")
    runs = []
    for dataset, data_overrides in (b.datasets or {None: []}).items():
        for method, overrides in b.methods.items():
            for seed in b.seeds:
                name = "_".join([cfg.name, *([dataset] if dataset else []), method, f"s{seed}"])
                where = f"benchmark.methods.{method}" + (f" / benchmark.datasets.{dataset}" if dataset else "")
                try:
                    raw = apply_overrides(base, [*data_overrides, *overrides, f"seed={seed}", f"name={name}"])
                except ConfigError as e:
                    raise ConfigError(f"{where}: {e}") from None
                raw.pop("tune", None)
                raw.pop("benchmark", None)
                raw["baseline"] = None  # a benchmark compares its methods at the end, not each run on its own
                runs.append(BenchmarkRun(name, dataset, method, seed, build_config(raw, source=where)))
    return runs


# ---------------------------------------------------------------------------------------------
# Resources: trials must never wait on each other's CPUs or GPUs


def worker_resources(cfg: Config) -> dict[str, float]:
    """What one training worker holds, by resource name, as recipes/launch._fit asks Ray Train for it."""
    r = cfg.ray
    return {"CPU": r.cpus_per_worker, **({"GPU": 1.0} if r.use_gpu else {}), **r.resources_per_worker}


def trial_resources(cfg: Config) -> dict[str, float]:
    """What one run holds while it trains: its Ray Train workers, its synthesis actors, the trial's own
    driver (0.1 CPU) and room for Ray Data's read tasks (1 CPU: a `ray.data.range` read asks for one),
    by resource name."""
    r = cfg.ray
    # With num_workers=0 the loop trains in the trial's own process, which then holds one worker's share.
    need: dict[str, float] = {k: v * max(1, r.num_workers) for k, v in worker_resources(cfg).items()}
    need["CPU"] = need.get("CPU", 0.0) + 0.1 + 1.0
    s = cfg.synthesis
    if s.mode != "none":
        need["CPU"] += s.pool_size * s.num_cpus
        if s.num_gpus:
            need["GPU"] = need.get("GPU", 0.0) + s.pool_size * s.num_gpus
        for k, v in s.resources.items():
            need[k] = need.get(k, 0.0) + v * s.pool_size
    return need


def max_concurrent_trials(cluster: dict[str, float], per_trial: dict[str, float], limit: int | None = None,
                          has: str = "has") -> int:
    """How many trials fit in the cluster's resources side by side (at least 1, at most `limit`);
    `cluster`: the most of each resource it has or can scale to (ioisray.cluster.capacity), `has` how
    the error says so.

    A trial whose needs the cluster cannot meet at all is an error here rather than a wait forever.
    """
    fits = []
    for k, v in per_trial.items():
        if v <= 0:
            continue
        have = cluster.get(k, 0.0)
        if have + 1e-9 < v:
            raise ConfigError(f"one trial needs {v:g} {k} (ray.*, synthesis.*) but the cluster {has} {have:g}")
        fits.append(int(math.floor(have / v + 1e-9)))
    n = min(fits) if fits else 1
    return max(1, min(n, limit) if limit else n)


# ---------------------------------------------------------------------------------------------
# Tables of finished runs


TABLE_KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "mcc", "auc")


def aggregate(results: dict[str, dict], group_of: dict[str, str]) -> list[dict]:
    """Mean and std over the runs of each group (e.g. the seeds of a method) of every test metric.

    `results`: run name -> its metrics.json; `group_of`: run name -> group name. Returns one row per
    group, in first-seen order: {"group", "runs", "<metric>_mean", "<metric>_std", "acc[<class>]_mean", ...}.
    """
    groups: dict[str, list[dict]] = {}
    for run, g in group_of.items():
        if run in results:
            groups.setdefault(g, []).append(results[run])
    rows = []
    for g, rs in groups.items():
        names = rs[0]["class_names"]
        row: dict[str, Any] = {"group": g, "runs": len(rs)}
        columns = {k: [r["test"][k] for r in rs] for k in TABLE_KEYS if k in SUMMARY_KEYS}
        columns.update({f"acc[{n}]": [r["test"]["per_class_accuracy"][n] for r in rs] for n in names})
        for k, values in columns.items():
            v = np.asarray(values, dtype=float)
            row[f"{k}_mean"], row[f"{k}_std"] = float(np.mean(v)), float(np.std(v))
        row["seconds_mean"] = float(np.mean([r.get("seconds", np.nan) for r in rs]))
        rows.append(row)
    return rows


def _columns(rows: Sequence[dict]) -> list[str]:
    return [k[: -len("_mean")] for k in rows[0] if k.endswith("_mean") and k != "seconds_mean"] if rows else []


def results_markdown(rows: Sequence[dict], title: str = "") -> str:
    """Mean ± std (over runs) per group and test metric, one row per group."""
    cols = _columns(rows)
    lines = ([f"{title}\n"] if title else []) + [
        "| method | runs | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for r in rows:
        cells = [f"{r[c + '_mean']:.4f} ± {r[c + '_std']:.4f}" for c in cols]
        lines.append(f"| {r['group']} | {r['runs']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def results_csv(rows: Iterable[dict]) -> str:
    rows = list(rows)
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return buf.getvalue()


def comparisons(methods: Sequence[str], baseline: str | None, extra: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The (method, against) pairs a benchmark tabulates: every method against the baseline, then `extra`."""
    pairs = [(m, baseline) for m in methods if baseline is not None and m != baseline] + [tuple(p) for p in extra]
    return list(dict.fromkeys(pairs))


def paired_rows(predictions: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]], pairs: Sequence[tuple[str, str]],
                num_classes: int, resamples: int = 2000) -> list[dict]:
    """Per (method, against) pair, over the seeds both have (`predictions`: (method, seed) -> (labels,
    predicted classes) on one test split), metrics.paired_bootstrap's differences and 95% intervals."""
    rows = []
    for a, b in pairs:
        seeds = sorted(s for (m, s) in predictions if m == a and (b, s) in predictions)
        if not seeds:
            continue
        y = predictions[(a, seeds[0])][0]
        diff = paired_bootstrap(y, [predictions[(a, s)][1] for s in seeds], [predictions[(b, s)][1] for s in seeds],
                                num_classes, resamples=resamples)
        row: dict[str, Any] = {"method": a, "against": b, "seeds": len(seeds)}
        for k in PAIRED_KEYS:
            row[f"{k}_diff"], row[f"{k}_low"], row[f"{k}_high"] = diff[k]
        rows.append(row)
    return rows


def paired_markdown(rows: Sequence[dict], resamples: int = 2000) -> str:
    """The paired differences as a table; an interval that excludes 0 is marked *."""
    head = ("Paired differences on the same test images, mean over the seeds both methods have, with a 95% "
            f"bootstrap interval over the test images ({resamples} resamples; * excludes 0):\n\n"
            "| method | against | seeds | " + " | ".join(f"Δ {k} [95% CI]" for k in PAIRED_KEYS) + " |\n"
            "|---|---|---|" + "---|" * len(PAIRED_KEYS) + "\n")

    def cell(r, k):
        d, lo, hi = r[f"{k}_diff"], r[f"{k}_low"], r[f"{k}_high"]
        return f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}]" + ("*" if lo > 0 or hi < 0 else "")

    return head + "".join(f"| {r['method']} | {r['against']} | {r['seeds']} | "
                          + " | ".join(cell(r, k) for k in PAIRED_KEYS) + " |\n" for r in rows)
