"""The real `ioisray` entry point: bad input fails fast and clearly; a tiny run goes end to end on Ray."""
import json
import shutil

import pytest
from cli_utils import ROOT, run_cli

from ioisray.cli import main
from ioisray.config import ConfigError, load_config
from ioisray.run import run_dir

# A tiny but real run: 2 Ray Train workers (DDP over gloo), a small timm model, 16x16 digits.
TINY = ["model.name=resnet10t", "data.image_size=16", "train.batch_size=16", "ray.num_workers=2"]


def test_config_errors_exit_2_naming_the_key(capsys):
    assert main(["train", str(ROOT / "configs/digits_ce.yaml"), "train.epochz=1"]) == 2
    assert "train.epochz: unknown key" in capsys.readouterr().err
    assert main(["train", str(ROOT / "configs/digits_ce.yaml"), "--set", "method.loss=nope"]) == 2
    assert "method.loss" in capsys.readouterr().err


def test_data_errors_exit_2_naming_the_path(tmp_path, capsys):
    missing = tmp_path / "no_such_dataset"
    assert main(["train", str(ROOT / "configs/digits_ce.yaml"), "data.name=imagefolder",
                 f"data.root={missing}", f"output_dir={tmp_path}"]) == 2
    assert str(missing) in capsys.readouterr().err


@pytest.mark.parametrize("override, key", [
    ("data.val_fraction=0", "data.val_fraction"),  # no validation split to select the best epoch on
    ("model.name=resnet_nope", "model.name"),  # checked before Ray starts, not inside a worker
    ("model.weights=/no/such/file.safetensors", "model.weights"),
    ("baseline=/no/such/config.yaml", "baseline"),
    ("synthesis.mode=online", "synthesis.budget"),
])
def test_bad_run_settings_fail_before_ray_starts(tmp_path, capsys, override, key):
    assert main(["train", str(ROOT / "configs/digits_ce.yaml"), override, f"output_dir={tmp_path}"]) == 2
    assert key in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written for a run that never started


def test_a_bad_diffusion_model_fails_before_ray_starts(tmp_path, capsys):
    args = ["train", str(ROOT / "configs/digits_ce.yaml"), "synthesis.mode=online", "synthesis.budget=8",
            f"output_dir={tmp_path}"]
    assert main([*args, f"diffusion.model_dir={tmp_path / 'none'}"]) == 2
    assert "diffusion.model_dir" in capsys.readouterr().err
    from ioisray.models.diffusion import create_unet

    create_unet("tiny", num_classes=3, image_size=16).save_pretrained(tmp_path / "unet3")
    assert main([*args, f"diffusion.model_dir={tmp_path / 'unet3'}"]) == 2
    assert "built for 3 classes but the dataset has 10" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["unet3"]  # no run folder was made


def test_resuming_with_another_config_is_refused(tmp_path):
    from ioisray.config import load_config as lc, save_config
    from ioisray.run import Run

    cfg = lc(ROOT / "configs/digits_ce.yaml", [f"output_dir={tmp_path}"])
    (run_dir(cfg) / "checkpoints" / "epoch_00001").mkdir(parents=True)
    save_config(cfg, run_dir(cfg) / "config.yaml")
    Run(lc(ROOT / "configs/digits_ce.yaml", [f"output_dir={tmp_path}", "ray.num_workers=4"])).check_resumable()
    with pytest.raises(ConfigError, match=r"data\.test_fraction, seed"):  # where it runs may change, nothing else
        Run(lc(ROOT / "configs/digits_ce.yaml", [f"output_dir={tmp_path}", "seed=1",
                                                 "data.test_fraction=0.3"])).check_resumable()


def test_a_benchmark_report_with_nothing_finished_says_so(tmp_path, capsys):
    args = ["benchmark", str(ROOT / "configs/digits.yaml"), f"output_dir={tmp_path}", "--report-only",
            "benchmark.methods={ce: [synthesis.mode=none]}", "benchmark.seeds=[0, 1]"]
    assert main(args) == 1
    out, err = capsys.readouterr()
    assert "2 runs, 0 finished already, 2 to run (not now: --report-only)" in out
    assert f"no run of benchmark digits_iois has finished in {tmp_path} (run it without --report-only)" in err
    assert not list(tmp_path.iterdir())  # nothing written


def test_print_config_shows_resolved_values(capsys):
    assert main(["train", str(ROOT / "configs/digits_ce.yaml"), "train.epochs=3", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "epochs: 3" in out and "name: digits_lt" in out


@pytest.mark.ray
def test_train_end_to_end_with_ray_and_a_storage_uri(tmp_path, monkeypatch, capsys):
    # Exercises the re-sampling dataset, mixup and a re-weighted loss inside Ray Train as well. Outputs
    # go to a filesystem URI (as s3://... on a cluster), through a local staging folder.
    staging = {"IOISRAY_STAGING": str(tmp_path / "staging")}
    args = ["train", "configs/digits_ce.yaml", *TINY, "train.epochs=2", "name=e2e",
            f"output_dir=file://{tmp_path}/store", "method.sampling=class_balanced", "method.mixup_alpha=0.2",
            "method.loss=cb_focal"]
    r = run_cli(*args, env=staging)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "| balanced_accuracy |" in r.stdout and "epoch 2/2" in r.stdout + r.stderr
    run = tmp_path / "store" / "e2e"
    assert f"results: file://{run}/metrics.json" in r.stdout
    # Rank 0 wrote its checkpoints straight to the URI, each with its manifest; the final one holds the results.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch_00001", "epoch_00002", "final"]
    assert (run / "checkpoints" / "final" / "manifest.json").is_file() and not (run / ".lock").exists()
    results = json.loads((run / "metrics.json").read_text())
    for split in ("val", "test"):
        assert set(results[split]) >= {"accuracy", "balanced_accuracy", "macro_f1", "macro_precision", "mcc",
                                       "auc", "per_class_accuracy", "confusion_matrix"}
    # every test image evaluated once, none dropped
    assert results["test"]["num_samples"] == results["splits"]["test"]
    assert sum(map(sum, results["test"]["confusion_matrix"])) == results["splits"]["test"]
    assert len(results["history"]) == 2
    assert load_config(run / "config.yaml").name == "e2e"
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert "| metric |" in (run / "metrics.md").read_text()
    from ioisray.recipes.sample import load_classifier_run  # the tested weights, reloadable on their own
    model, _, names = load_classifier_run(run)
    assert names == results["class_names"] and model.fc.out_features == 10
    # The test split has been used: running the same run again is refused, results untouched, even
    # from a machine that has no local copy of the run (it is read back from the URI).
    shutil.rmtree(tmp_path / "staging")
    monkeypatch.setenv("IOISRAY_STAGING", staging["IOISRAY_STAGING"])
    monkeypatch.chdir(ROOT)
    capsys.readouterr()
    assert main(args) == 2  # in-process: refused before Ray starts
    assert "has finished (its test split was used once already)" in capsys.readouterr().err
    assert json.loads((run / "metrics.json").read_text()) == results
