"""The real `ioisray` entry point: bad input fails fast and clearly (a run end to end: test_job.py)."""
import errno
from pathlib import Path

import pytest
from cli_utils import ROOT, run_cli

from ioisray.cli import main
from ioisray.config import ConfigError
from ioisray.run import run_dir



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


@pytest.mark.parametrize("err, why", [(errno.EROFS, "Read-only file system"), (errno.ENOSPC, "No space left on device")])
def test_an_output_dir_that_cannot_be_written_is_one_line_before_ray_starts(tmp_path, capsys, monkeypatch, err, why):
    # Root ignores permission bits, so a read-only or full disk is simulated where the run folder is written.
    real_write_bytes = Path.write_bytes

    def write_bytes(self, data):
        if str(self).startswith(str(tmp_path)):
            raise OSError(err, why, str(self))
        return real_write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    monkeypatch.chdir(ROOT)
    assert main(["train", "configs/digits_ce.yaml", f"output_dir={tmp_path}/out", "name=ro"]) == 2
    err_text = capsys.readouterr().err
    assert f"output_dir: cannot write the run folder {tmp_path}/out/ro ({why})" in err_text
    assert "Traceback" not in err_text and len(err_text.strip().splitlines()) == 1
    assert not list((tmp_path / "out" / "ro").iterdir())  # nothing half-written


@pytest.mark.ray
def test_a_ray_that_does_not_start_in_time_is_one_line_and_loses_nothing(tmp_path):
    # A start-up limit no Ray meets: what a machine too busy for the limit sees.
    r = run_cli("train", "configs/digits_ce.yaml", f"output_dir={tmp_path}", "name=late", "ray.start_timeout_s=0.001")
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-3000:]
    assert r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr[-3000:]  # one line
    assert r.stderr.startswith("ioisray: error: Ray did not start within 0.001 s (ray.start_timeout_s): ")
    assert "rerun when the machine is less busy, or give Ray longer" in r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    run = tmp_path / "late"
    assert (run / "config.yaml").is_file() and not (run / ".lock").exists()  # released, resumable
