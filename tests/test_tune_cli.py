"""`ioisray tune` and `ioisray benchmark` through the real entry point, on the embedded digits (CPU).
Trials are CE runs trained in the trial's own process (ray.num_workers=0, as configs/digits.yaml has it;
no synthesis): what is tested is the search, its resumption and the grid's tables, not IOIS (test_job.py
runs that) or Ray Train's workers (test_job.py, test_cluster.py)."""
import csv
import json
import re
import signal

import numpy as np
import pytest
from cli_utils import ROOT, interrupt_after, latest_epoch, run_cli
from PIL import Image

from ioisray.cli import main
from ioisray.config import load_config

pytestmark = pytest.mark.ray

TINY_CE = ["model.name=resnet10t", "data.image_size=16", "train.batch_size=16", "ray.num_workers=0"]


def test_a_stopped_search_resumes_and_asha_stops_the_weak_trial(tmp_path):
    # Two trials, one at a time: the second learns nothing (lr 1e-7), so ASHA stops it at its first
    # rung, after epoch 1 of 2. The search is stopped during the first trial by SIGTERM (what docker stop,
    # systemd, Kubernetes, Slurm and `timeout` send; ioisray treats it as Ctrl-C), then rerun.
    # Started in tmp_path with the default, relative output_dir: the trials, each in a working folder of
    # Tune's, write where the user would look (tmp_path/outputs), not below Ray's session folder.
    args = ["tune", str(ROOT / "configs/digits_ce.yaml"), *TINY_CE, "name=search",
            "train.epochs=2", "train.optimizer=adamw", "train.warmup_epochs=0",
            "tune.search_space={train.lr: {grid: [3.0e-3, 1.0e-7]}, aas.temperature: {choice: [0.5, 2.0]}}",
            "tune.grace_period=1", "tune.reduction_factor=2", "tune.max_concurrent_trials=1"]
    search = tmp_path / "outputs" / "search"

    def epochs_of_the_first_trial():
        return max((latest_epoch(t) for t in (search / "trials").glob("trial_*")), default=0)

    done, printed, code = interrupt_after(args, search, epochs=1, timeout=300, progress=epochs_of_the_first_trial,
                                          cwd=tmp_path, sig=signal.SIGTERM)
    assert done >= 1 and not (search / "trials.csv").exists(), "the search was not stopped:\n" + printed[-3000:]
    assert code == 143, printed[-3000:]  # 128 + SIGTERM
    assert "stopped by SIGTERM: tune: the search was interrupted; rerun the same command to resume it" in printed
    assert "Traceback" not in printed and "SIGTERM received" not in printed, printed[-3000:]
    r = run_cli(*args, timeout=600, cwd=tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    assert f"resuming the search in {search / 'tune'}" in out
    # Tune's own console output stays out (ioisray prints the trials' table), and each trial's lines
    # say which trial they are of.
    for printed_by_tune in ("Configuration for experiment", "To visualize your results with TensorBoard",
                            "may be a performance bottleneck", "Tuner.restore", "Resume experiment with",
                            "Stop signal received"):
        assert printed_by_tune not in out + printed, printed_by_tune
    assert re.search(r"^\[trial_\w+\] epoch 1/2 loss", out, flags=re.M), out[-3000:]
    with open(search / "trials.csv") as f:
        trials = {float(t["train.lr"]): t for t in csv.DictReader(f)}
    assert set(trials) == {3e-3, 1e-7}
    assert trials[3e-3]["status"] == "completed" and int(trials[3e-3]["epochs"]) == 2
    assert trials[1e-7]["status"] == "stopped early" and int(trials[1e-7]["epochs"]) == 1
    assert float(trials[3e-3]["best_val_balanced_accuracy"]) > float(trials[1e-7]["best_val_balanced_accuracy"])
    assert {float(t["aas.temperature"]) for t in trials.values()} <= {0.5, 2.0}
    # The interrupted trial's run was resumed from its checkpoint, or, if it had finished meanwhile, kept:
    # each epoch in its history once.
    first = json.loads((search / "trials" / f"trial_{trials[3e-3]['trial']}" / "metrics.json").read_text())
    assert [h["epoch"] for h in first["history"]] == [0, 1]
    assert done == 2 or "resumed from epoch 1" in out  # stopped mid-run: the run resumed
    assert first["test"] is None  # trials never touch the test split
    # Neither the finished trial nor the stopped one keeps checkpoints (train.keep_checkpoints is off):
    # neither will ever resume; their results and the finished one's weights stay.
    for t in trials.values():
        trial = search / "trials" / f"trial_{t['trial']}"
        assert (trial / "config.yaml").is_file() and not (trial / "checkpoints").exists()
    assert (search / "trials" / f"trial_{trials[3e-3]['trial']}" / "best_model.safetensors").is_file()

    cfg = load_config(search / "best_config.yaml")  # a complete config `ioisray train` accepts
    assert cfg.train.lr == 3e-3 and cfg.aas.temperature == float(trials[3e-3]["aas.temperature"])
    assert cfg.name == "search_best" and cfg.tune.search_space == {}
    assert "best config: " in r.stdout and "stopped early" in (search / "trials.md").read_text()


def _finished_iois_run(path, class_names):
    """A finished IOIS run as the benchmark reads it: its metrics.json and real-vs-synthetic figure."""
    path.mkdir(parents=True)
    acc = {n: 0.5 + 0.05 * i for i, n in enumerate(class_names)}
    test = {"accuracy": 0.8, "balanced_accuracy": 0.75, "macro_f1": 0.7, "macro_precision": 0.7, "mcc": 0.6,
            "auc": 0.9, "per_class_accuracy": acc}
    (path / "metrics.json").write_text(json.dumps({"class_names": class_names, "test": test, "history": [],
                                                   "seconds": 1.0}))
    noise = np.random.default_rng(0).integers(0, 256, (100, 200, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path / "real_vs_synthetic.png")
    return test


def test_benchmark_tabulates_every_finished_run_skips_them_and_names_the_missing(tmp_path, monkeypatch, capsys):
    # The Tune machinery that runs a grid's unfinished runs as trials is the search's (the test above):
    # here the CE run is made by the benchmark's own trial function, in this process,
    # and the IOIS run is a finished one as the benchmark reads it.
    from ioisray.experiments import benchmark_runs
    from ioisray.recipes.benchmark import benchmark_trial

    outputs = tmp_path / "outputs"  # the default, relative output_dir, from the folder the command starts in
    iois = _finished_iois_run(outputs / "bench_iois_s0", [str(i) for i in range(10)])
    args = ["benchmark", str(ROOT / "configs/digits_ce.yaml"), *TINY_CE, "name=bench", "train.epochs=1",
            "benchmark.methods={ce: [], iois: [synthesis.mode=online, synthesis.budget=8]}",
            "benchmark.seeds=[0]", "benchmark.baseline=ce"]
    monkeypatch.chdir(tmp_path)
    runs = {r.name: r for r in benchmark_runs(load_config(args[1], args[2:]))}
    assert set(runs) == {"bench_ce_s0", "bench_iois_s0"} and runs["bench_ce_s0"].config.baseline is None
    benchmark_trial({"run": "bench_ce_s0"}, configs={"bench_ce_s0": runs["bench_ce_s0"].config.model_dump(mode="json")})
    ce = json.loads((outputs / "bench_ce_s0" / "metrics.json").read_text())
    assert ce["test"]["num_samples"] == ce["splits"]["test"] and "quotas" not in ce["history"][0]
    # The fabricated IOIS run, tested on CE's test split, is right on every one of its images: a paired difference.
    fabricated = json.loads((outputs / "bench_iois_s0" / "metrics.json").read_text())
    fabricated.update(split_ids=ce["split_ids"], test_predictions_in_split_order=True)
    (outputs / "bench_iois_s0" / "metrics.json").write_text(json.dumps(fabricated))
    assert ce["test_predictions_in_split_order"]
    with open(outputs / "bench_ce_s0" / "test_predictions.csv", newline="") as f:
        ce_rows = list(csv.DictReader(f))
    with open(outputs / "bench_iois_s0" / "test_predictions.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(ce_rows[0]))
        w.writeheader()
        w.writerows({**r, "predicted": r["label"]} for r in ce_rows)

    capsys.readouterr()
    assert main(args) == 0  # with nothing to run, Ray is not started
    out = capsys.readouterr().out
    assert "2 runs, 2 finished already, 0 to run" in out
    table = (outputs / "bench" / "results.md").read_text()
    with open(outputs / "bench" / "results.csv") as f:
        rows = {row["group"]: row for row in csv.DictReader(f)}
    assert set(rows) == {"ce", "iois"} and rows["ce"]["runs"] == "1"
    assert float(rows["iois"]["balanced_accuracy_mean"]) == pytest.approx(iois["balanced_accuracy"])
    assert float(rows["ce"]["balanced_accuracy_mean"]) == pytest.approx(ce["test"]["balanced_accuracy"])
    for key in ("accuracy", "macro_f1", "mcc", "auc", "acc[9]"):
        assert f"{key}_std" in rows["iois"] and key in table
    with open(outputs / "bench" / "paired.csv") as f:
        (paired,) = list(csv.DictReader(f))
    assert (paired["method"], paired["against"], paired["seeds"]) == ("iois", "ce", "1")
    gap = 1 - ce["test"]["balanced_accuracy"]
    assert float(paired["balanced_accuracy_diff"]) == pytest.approx(gap)
    assert 0 < float(paired["balanced_accuracy_low"]) <= gap <= float(paired["balanced_accuracy_high"])
    assert "Paired differences on the same test images" in table and "| iois | ce | 1 |" in table
    for figure in ("per_class_change_iois_vs_ce.png", "real_vs_synthetic_iois.png"):
        assert (outputs / "bench" / figure).stat().st_size > 1000
        assert f"figure: {outputs / 'bench' / figure}" in out

    # Rerun: finished runs are skipped, untouched.
    before = (outputs / "bench_ce_s0" / "metrics.json").stat().st_mtime_ns
    assert main(args) == 0
    assert "2 runs, 2 finished already, 0 to run" in capsys.readouterr().out
    assert before == (outputs / "bench_ce_s0" / "metrics.json").stat().st_mtime_ns
    assert (outputs / "bench" / "results.md").read_text() == table
    # One more method: --report-only starts nothing, tabulates what finished and names what did not.
    methods = "benchmark.methods={ce: [], iois: [synthesis.mode=online, synthesis.budget=8], focal: [method.loss=focal]}"
    assert main([*args[:-3], methods, *args[-2:], "--report-only"]) == 1
    out, err = capsys.readouterr()
    assert "did not finish: bench_focal_s0" in err and not (outputs / "bench_focal_s0").exists()
    assert "2 finished already, 1 to run (not now: --report-only)" in out
    assert (outputs / "bench" / "results.md").read_text() == table


def test_a_search_over_an_unknown_key_is_refused_before_ray_starts(tmp_path, capsys):
    assert main(["tune", str(ROOT / "configs/digits.yaml"), f"output_dir={tmp_path}",
                 "tune.search_space={aas.temperture: {grid: [1, 2]}}"]) == 2
    assert "'aas.temperture' is not a config key" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
