"""The GPU acceptance script cannot rot: its CPU dry run (every check, at tiny sizes, through the same
functions) passes here, and what the GPU machine needs of it (one line for a missing package, a time
budget, checks stopped at their time, no two NCCL ranks on one GPU) is checked on the CPU."""
import importlib
import json
import math
import subprocess
import sys
import time

import pytest
from cli_utils import ENV, ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_acceptance.py"


@pytest.fixture(scope="module")
def acceptance():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    return importlib.import_module("gpu_acceptance")


def run_script(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env={**ENV, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.ray
def test_the_gpu_acceptance_script_passes_its_cpu_dry_run(tmp_path):
    r = run_script("--cpu-dry-run", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), timeout=1300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    checks = {c["check"]: c for c in results["checks"]}
    assert list(checks) == ["classifier_training", "sampling_small64", "sampling_adm128", "iois_epoch", "iois_resume",
                            "iois_two_workers"]
    two = checks.pop("iois_two_workers")
    assert two["status"] == "SKIPPED" and "2 GPUs" in two["detail"]  # never two NCCL ranks on one GPU
    adm = checks.pop("sampling_adm128")
    assert adm["status"] == "SKIPPED" and "sampling_small64" in adm["detail"]  # the same tiny model on the CPU
    resume = checks.pop("iois_resume")
    assert resume["status"] == "SKIPPED" and "job and Tune tests" in resume["detail"]  # a second Ray start: GPU only
    assert {c["status"] for c in checks.values()} == {"PASS"}, checks
    for c in checks.values():  # each with its figure, the goal it is held to, and the time it was given
        assert math.isfinite(c["value"]) and c["goal"] and 0 < c["timeout_s"] <= results["budget_s"], c
        assert f"PASS    {c['check']}: {c['value']} {c['unit']}; goal: {c['goal']}" in r.stdout
    assert checks["classifier_training"]["figures"]["images"] == 3 * 16  # every batch counted by train_one_epoch
    assert checks["sampling_small64"]["figures"]["preset"] == "tiny"
    # One epoch through Ray Train in a real process group (gloo here, NCCL on a GPU), even at world size 1:
    (probe,) = checks["iois_epoch"]["figures"]["probe"]
    assert (probe["backend"], probe["world_size"], probe["all_reduce_sum"]) == ("gloo", 1, 1.0)
    first = checks["iois_epoch"]["figures"]["first_epoch"]
    assert first["synthetic_received"] == first["quota"] > 0
    # ...stopped after it (Ctrl-C, as a user stops a run), with that epoch saved for iois_resume on a GPU.
    assert checks["iois_epoch"]["figures"]["epochs_saved_when_stopped"] >= 1


def test_the_gpu_settings_of_the_speed_checks_are_valid_configs_with_their_goals_settings(acceptance):
    # What only the GPU run uses is validated here, so that a bad key fails on the CPU, not in the GPU's hour.
    cfg, warm, timed = acceptance.training_config(dry_run=False)
    assert (cfg.model.name, cfg.data.image_size, cfg.train.precision, cfg.train.channels_last) == (
        "resnet50", 224, "bf16", True) and warm > 0 and timed > 0
    for check, preset in (("sampling_small64", "small64"), ("sampling_adm128", "adm128")):
        cfg, repeats = acceptance.sampling_config(check, dry_run=False)
        s = cfg.sampler
        assert (cfg.diffusion.preset, s.steps, s.solver, s.dtype, s.compile) == (preset, 50, "ddim", "bfloat16", True)
        assert s.guidance_scale > 0 and cfg.synthesis.num_gpus == 1 and repeats >= 1


def test_a_missing_package_is_named_in_one_line_without_a_traceback(tmp_path):
    # Packages that cannot be imported, as on a GPU image without the device bundle: they shadow the real ones.
    for name in ("pydantic", "ray"):
        (tmp_path / "shadow" / name).mkdir(parents=True)
        (tmp_path / "shadow" / name / "__init__.py").write_text(
            f"raise ModuleNotFoundError(\"No module named '{name}'\", name='{name}')\n")
    r = run_script("--cpu-dry-run", "--out", str(tmp_path / "out"),
                   env={"PYTHONPATH": f"{tmp_path / 'shadow'}:{ENV.get('PYTHONPATH', '')}"})
    lines = (r.stdout + r.stderr).strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1, r.stdout + r.stderr
    assert lines[0].startswith("gpu_acceptance: missing python packages: pydantic, ray - install the device bundle")
    assert not (tmp_path / "out" / "results.json").exists()  # nothing ran


def test_a_budget_too_short_for_any_check_skips_them_all_and_says_why(acceptance, tmp_path, capsys):
    ctx = acceptance.Context(dry_run=True, out=tmp_path, work=tmp_path, gpus=0,
                             results=acceptance.Results(tmp_path / "results.json"), compile_backend="eager")
    assert acceptance.run_all(ctx, budget_s=10, only=None, started=time.monotonic()) == 0
    assert "0 PASS, 0 FAIL, 6 SKIPPED" in capsys.readouterr().out
    checks = json.loads((tmp_path / "results.json").read_text())["checks"]
    assert len(checks) == 6 and {c["status"] for c in checks} == {"SKIPPED"}
    skipped = {c["check"]: c["detail"] for c in checks}
    assert all("budget left" in why for check, why in skipped.items()
               if check not in ("iois_two_workers", *acceptance.DRY_RUN_SKIPS)), skipped


def test_a_check_past_its_time_is_stopped_and_recorded_as_a_timeout(acceptance, tmp_path):
    ctx = acceptance.Context(dry_run=True, out=tmp_path, work=tmp_path, gpus=0,
                             results=acceptance.Results(tmp_path / "results.json"), compile_backend="eager")
    check = acceptance.BY_ID["classifier_training"]
    ctx.results.create({}, [check])
    ctx.results.update(check.id, status="RUNNING")
    # Too short for the child even to import torch: it is stopped in the middle, as a hung compile would be.
    proc = acceptance.run_in_child(ctx, check, timeout=0.2)
    assert proc.returncode is not None  # ended, not left running
    entry = ctx.results.entry(check.id)
    assert entry["status"] == "FAIL" and entry["timed_out"] and entry["detail"].startswith("timed out after")


@pytest.mark.parametrize("gpus", [2, 3, 4, 8])
def test_the_two_worker_run_gives_each_nccl_rank_a_whole_gpu(acceptance, tmp_path, gpus):
    from ioisray.config import load_config
    from ioisray.experiments import trial_resources, worker_resources

    ctx = acceptance.Context(dry_run=False, out=tmp_path, work=tmp_path, gpus=gpus, results=None,
                             compile_backend="inductor")
    cfg = load_config(ROOT / "configs" / "digits.yaml", acceptance.iois_overrides(ctx, "two", 2, tmp_path / "unet"))
    assert cfg.ray.num_workers == 2 and cfg.ray.use_gpu
    # A whole GPU per worker: Ray cannot place both on one GPU, where NCCL fails ("Duplicate GPU detected").
    assert worker_resources(cfg)["GPU"] >= 1
    assert trial_resources(cfg)["GPU"] <= gpus  # and the run fits the machine (synthesis on the GPUs left over)


def test_the_two_worker_check_is_skipped_below_two_gpus(acceptance, tmp_path):
    with pytest.raises(ValueError, match="need 2 GPUs"):
        acceptance.two_worker_overrides(1)
    ctx = acceptance.Context(dry_run=False, out=tmp_path, work=tmp_path, gpus=1, results=None,
                             compile_backend="inductor")
    reasons = dict((c.id, reason) for c, reason in acceptance.plan(ctx, None))
    assert reasons["iois_two_workers"] == "needs 2 GPUs (one per NCCL rank), this machine has 1"
    assert all(r is None for k, r in reasons.items() if k != "iois_two_workers")
