"""Search and benchmark plumbing without Ray: trial configs, search-space checks, the grid of runs,
trial resources and concurrency, and the aggregated tables."""
import csv
import io

import numpy as np
import pytest

from ioisray.config import ConfigError, load_config
from ioisray.experiments import (aggregate, benchmark_runs, check_search_space, max_concurrent_trials,
                                 results_csv, results_markdown, trial_config, trial_resources)
from ioisray.recipes.launch import _trial_process_resources


def test_unknown_search_key_is_an_error_naming_it():
    with pytest.raises(ConfigError, match="aas.temprature"):
        load_config("configs/digits.yaml", ["tune.search_space={aas.temprature: {grid: [1, 2]}}"])
    with pytest.raises(ConfigError, match="exactly one of"):
        load_config("configs/digits.yaml", ["tune.search_space={aas.temperature: {grid: [1], choice: [2]}}"])
    with pytest.raises(ConfigError, match="low < high"):
        load_config("configs/digits.yaml", ["tune.search_space={aas.temperature: {uniform: [2, 1]}}"])


def test_every_value_a_search_may_try_is_checked_before_it_starts():
    ok = load_config("configs/digits.yaml", ["tune.search_space={aas.temperature: {loguniform: [0.1, 10]}, "
                                             "synthesis.budget: {grid: [16, 64]}}"])
    check_search_space(ok)
    bad = load_config("configs/digits.yaml", ["tune.search_space={synthesis.budget: {grid: [16, -4]}}"])
    with pytest.raises(ConfigError, match=r"tune.search_space.synthesis.budget: the value -4"):
        check_search_space(bad)
    for key in ("seed", "data.image_size", "diffusion.preset", "name"):
        shared = load_config("configs/digits.yaml", [f"tune.search_space={{{key}: {{grid: [1]}}}}"])
        with pytest.raises(ConfigError, match="cannot be searched"):
            check_search_space(shared)
    with pytest.raises(ConfigError, match="tune.search_space is empty"):
        check_search_space(load_config("configs/digits.yaml"))


def test_trial_config_sets_dotted_keys_and_drops_the_search():
    base = load_config("configs/digits.yaml", ["tune.search_space={aas.temperature: {grid: [1, 2]}}"])
    cfg = trial_config(base, {"aas.temperature": 0.25, "train.augment.hflip": True}, name="t1", output_dir="/x")
    assert cfg.aas.temperature == 0.25 and cfg.train.augment.hflip and cfg.name == "t1"
    assert cfg.tune.search_space == {} and base.aas.temperature == 1.0
    assert cfg.synthesis == base.synthesis


def test_benchmark_grid_names_runs_and_reports_bad_overrides_by_method():
    cfg = load_config("configs/digits.yaml", [
        "name=b", "benchmark.seeds=[0, 3]", "benchmark.baseline=ce",
        "benchmark.methods={ce: [synthesis.mode=none], iois: [], focal: [synthesis.mode=none, method.loss=focal]}"])
    runs = benchmark_runs(cfg)
    assert [r.name for r in runs] == ["b_ce_s0", "b_ce_s3", "b_iois_s0", "b_iois_s3", "b_focal_s0", "b_focal_s3"]
    runs = runs[2:4] + runs[:2] + runs[4:]  # iois first below; its config must not see ce's overrides
    assert [r.config.seed for r in runs[:2]] == [0, 3] and runs[0].config.name == "b_iois_s0"
    assert runs[0].config.synthesis.mode == "online" and runs[2].config.synthesis.mode == "none"
    assert runs[4].config.method.loss == "focal" and all(r.config.baseline is None for r in runs)
    bad = cfg.model_copy(update={"benchmark": cfg.benchmark.model_copy(update={"methods": {"x": ["method.loss=nope"]}})})
    with pytest.raises(ConfigError, match=r"(?s)benchmark.methods.x.*method.loss.*nope"):
        benchmark_runs(bad)
    with pytest.raises(ConfigError, match="benchmark.baseline"):
        load_config("configs/digits.yaml", ["benchmark.methods={ce: []}", "benchmark.baseline=iois"])
    two_sets = load_config("configs/digits.yaml", ["name=b", "benchmark.seeds=[1]", "benchmark.methods={ce: []}",
                                                   "benchmark.datasets={lt10: [data.imbalance_ratio=10], "
                                                   "lt100: [data.imbalance_ratio=100]}"])
    runs = benchmark_runs(two_sets)
    assert [(r.name, r.config.data.imbalance_ratio) for r in runs] == [("b_lt10_ce_s1", 10.0), ("b_lt100_ce_s1", 100.0)]


def test_trial_resources_and_how_many_trials_fit():
    cfg = load_config("configs/digits.yaml", ["ray.num_workers=2", "ray.cpus_per_worker=1", "synthesis.pool_size=2",
                                              "synthesis.num_cpus=0.5"])
    need = trial_resources(cfg)
    assert need == pytest.approx({"CPU": 2 + 1 + 1.1})
    assert max_concurrent_trials({"CPU": 5.0}, need) == 1
    with pytest.raises(ConfigError, match="needs 4.1 CPU"):
        max_concurrent_trials({"CPU": 4.0}, need)
    assert max_concurrent_trials({"CPU": 17.0}, need) == 4
    assert max_concurrent_trials({"CPU": 16.0}, need, limit=2) == 2
    gpu = load_config("configs/ham10000_reduced.yaml", ["data.root=/x"])
    need = trial_resources(gpu)  # trainer and one synthesis actor share one GPU
    assert need["GPU"] == pytest.approx(1.0)
    assert max_concurrent_trials({"CPU": 64.0, "GPU": 4.0}, need) == 4
    assert max_concurrent_trials({"CPU": 64.0, "GPU": 8.0}, trial_resources(
        load_config("configs/ham10000.yaml", ["data.root=/x"]))) == 1  # 1 training + 4 synthesis GPUs
    with pytest.raises(ConfigError, match="needs 1 GPU"):
        max_concurrent_trials({"CPU": 64.0}, need)
    # A trial whose run trains in the trial's own process (ray.num_workers=0) holds one worker's share,
    # and that process is given it.
    in_process = load_config("configs/digits.yaml", ["ray.num_workers=0", "ray.cpus_per_worker=3",
                                                     "ray.use_gpu=true", "synthesis.mode=none"])
    assert trial_resources(in_process) == pytest.approx({"CPU": 3 + 1.1, "GPU": 1.0})
    assert _trial_process_resources(in_process) == pytest.approx({"CPU": 3.1, "GPU": 1.0})
    assert _trial_process_resources(load_config("configs/digits.yaml", ["ray.num_workers=2"])) == {"CPU": 0.1}


def _result(bacc, per_class, seconds=10.0):
    return {"class_names": ["a", "b"], "seconds": seconds,
            "test": {"accuracy": bacc + 0.1, "balanced_accuracy": bacc, "macro_f1": bacc - 0.1, "mcc": 0.5,
                     "auc": 0.9, "per_class_accuracy": dict(zip("ab", per_class))}}


def test_aggregate_mean_and_std_over_seeds_in_markdown_and_csv():
    results = {"x_ce_s0": _result(0.5, [0.9, 0.1]), "x_ce_s1": _result(0.7, [0.9, 0.5]),
               "x_iois_s0": _result(0.8, [0.8, 0.8])}
    rows = aggregate(results, {"x_ce_s0": "ce", "x_ce_s1": "ce", "x_iois_s0": "iois", "x_iois_s1": "iois"})
    assert [(r["group"], r["runs"]) for r in rows] == [("ce", 2), ("iois", 1)]
    assert rows[0]["balanced_accuracy_mean"] == pytest.approx(0.6)
    assert rows[0]["balanced_accuracy_std"] == pytest.approx(np.std([0.5, 0.7]))
    assert rows[0]["acc[b]_mean"] == pytest.approx(0.3) and rows[1]["acc[b]_std"] == 0.0
    md = results_markdown(rows)
    assert "| ce | 2 | 0.7000 ± 0.1000 | 0.6000 ± 0.1000 |" in md
    assert md.splitlines()[0].split(" | ")[2:] == ["accuracy", "balanced_accuracy", "macro_f1", "mcc", "auc",
                                                   "acc[a]", "acc[b] |"]
    table = list(csv.DictReader(io.StringIO(results_csv(rows))))
    assert table[1]["group"] == "iois" and float(table[1]["macro_f1_mean"]) == pytest.approx(0.7)
