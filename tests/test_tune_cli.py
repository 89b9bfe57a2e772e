"""`ioisray tune` and `ioisray benchmark` through the real entry point, on the embedded digits (CPU)."""
import csv
import json

import pytest
from cli_utils import ROOT, run_cli

from ioisray.cli import main
from ioisray.config import load_config
from ioisray.models.diffusion import create_unet

pytestmark = pytest.mark.ray

TINY = ["model.name=resnet10t", "data.image_size=16", "train.batch_size=16",
        "synthesis.chunk_size=4", "synthesis.num_cpus=0.5", "sampler.steps=4", "baseline=null"]


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("diffusion") / "unet"
    create_unet("tiny", num_classes=10, image_size=16).save_pretrained(path, safe_serialization=True)
    return path


def test_tune_stops_a_weak_trial_early_and_writes_a_best_config_train_accepts(tmp_path, unet_dir):
    # Two trials, one after the other (one fits in 4 logical CPUs): the second learns nothing
    # (lr 1e-7), so ASHA stops it at its first rung, after epoch 1 of 2.
    args = ["tune", "configs/digits.yaml", *TINY, "name=search", f"output_dir={tmp_path}",
            f"diffusion.model_dir={unet_dir}", "ray.num_workers=1", "synthesis.pool_size=1",
            "train.epochs=2", "train.optimizer=adamw", "train.warmup_epochs=0",
            "tune.search_space={train.lr: {grid: [3.0e-3, 1.0e-7]}, aas.temperature: {choice: [0.5, 2.0]}, "
            "synthesis.budget: {grid: [16]}}", "tune.grace_period=1", "tune.reduction_factor=2"]
    r = run_cli(*args, timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    search = tmp_path / "search"
    with open(search / "trials.csv") as f:
        trials = {float(t["train.lr"]): t for t in csv.DictReader(f)}
    assert set(trials) == {3e-3, 1e-7}
    assert trials[3e-3]["status"] == "completed" and int(trials[3e-3]["epochs"]) == 2
    assert trials[1e-7]["status"] == "stopped early" and int(trials[1e-7]["epochs"]) == 1
    assert float(trials[3e-3]["best_val_balanced_accuracy"]) > float(trials[1e-7]["best_val_balanced_accuracy"])
    assert {float(t["aas.temperature"]) for t in trials.values()} <= {0.5, 2.0}
    # Trials never touch the test split; each trial ran its own synthesis pool.
    finished = json.loads(next((search / "trials").glob("trial_*/metrics.json")).read_text())
    assert finished["test"] is None and finished["history"][0]["actors_started"] == 1

    best = search / "best_config.yaml"
    cfg = load_config(best)
    assert cfg.train.lr == 3e-3 and cfg.aas.temperature == float(trials[3e-3]["aas.temperature"])
    assert cfg.name == "search_best" and cfg.tune.search_space == {}
    assert "best config: " in r.stdout and "stopped early" in (search / "trials.md").read_text()
    r = run_cli("train", str(best), "train.epochs=1", "ray.num_workers=0", timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert json.loads((tmp_path / "search_best" / "metrics.json").read_text())["test"]["balanced_accuracy"] >= 0


def test_benchmark_writes_the_table_and_figures_and_skips_finished_runs(tmp_path, unet_dir, monkeypatch, capsys):
    args = ["benchmark", "configs/digits.yaml", *TINY, "name=bench", f"output_dir={tmp_path}",
            # 6 logical CPUs: two runs at a time (2.6 each: a worker, an actor, the trial, Ray Data)
            f"diffusion.model_dir={unet_dir}", "ray.num_workers=1", "ray.local_num_cpus=6", "synthesis.pool_size=1",
            "synthesis.budget=8",
            "train.epochs=1", "benchmark.methods={ce: [synthesis.mode=none], iois: []}", "benchmark.seeds=[0]",
            "benchmark.baseline=ce"]
    r = run_cli(*args, timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    assert "each trial holds {'CPU': 2.6}; 2 at a time" in r.stdout
    runs = ["bench_ce_s0", "bench_iois_s0"]  # two runs side by side; means over seeds: test_experiments.py
    metrics = {n: json.loads((tmp_path / n / "metrics.json").read_text()) for n in runs}
    assert "quotas" in metrics["bench_iois_s0"]["history"][0] and "quotas" not in metrics["bench_ce_s0"]["history"][0]

    table = (tmp_path / "bench" / "results.md").read_text()
    with open(tmp_path / "bench" / "results.csv") as f:
        rows = {row["group"]: row for row in csv.DictReader(f)}
    assert set(rows) == {"ce", "iois"} and rows["ce"]["runs"] == "1"
    assert float(rows["iois"]["balanced_accuracy_mean"]) == pytest.approx(metrics["bench_iois_s0"]["test"]["balanced_accuracy"])
    for key in ("accuracy", "macro_f1", "mcc", "auc", "acc[9]"):
        assert f"{key}_std" in rows["iois"] and key in table
    for figure in ("per_class_change_iois_vs_ce.png", "real_vs_synthetic_iois.png"):
        assert (tmp_path / "bench" / figure).stat().st_size > 1000
        assert f"figure: {tmp_path / 'bench' / figure}" in r.stdout

    # Rerun (in-process: with nothing to run, Ray is not started): finished runs are skipped.
    monkeypatch.chdir(ROOT)
    before = {n: (tmp_path / n / "metrics.json").stat().st_mtime_ns for n in runs}
    capsys.readouterr()
    assert main(args) == 0
    assert "2 runs, 2 finished already, 0 to run" in capsys.readouterr().out
    assert before == {n: (tmp_path / n / "metrics.json").stat().st_mtime_ns for n in runs}
    assert (tmp_path / "bench" / "results.md").read_text() == table
    # One more method: --report-only starts nothing, tabulates what finished and names what did not.
    assert main([*args[:-3], "benchmark.methods={ce: [synthesis.mode=none], iois: [], focal: [method.loss=focal]}",
                 *args[-2:], "--report-only"]) == 1
    out, err = capsys.readouterr()
    assert "did not finish: bench_focal_s0" in err and not (tmp_path / "bench_focal_s0").exists()
    assert "2 finished already, 1 to run (not now: --report-only)" in out
    assert (tmp_path / "bench" / "results.md").read_text() == table


def test_a_search_over_an_unknown_key_is_refused_before_ray_starts(tmp_path, capsys):
    assert main(["tune", str(ROOT / "configs/digits.yaml"), f"output_dir={tmp_path}",
                 "tune.search_space={aas.temperture: {grid: [1, 2]}}"]) == 2
    assert "'aas.temperture' is not a config key" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
