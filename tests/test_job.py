"""The main job's path end to end, through the real `ioisray` entry point, once for this module: a tiny
IOIS run on the embedded digits that trains its CE baseline first (in-process), with outputs on a
filesystem URI (as s3://... on a cluster). It is stopped three ways along the way and must lose nothing:
  1. Ctrl-C during the baseline; the baseline's newest checkpoint is then damaged on disk;
  2. rerun: the baseline resumes from the checkpoint before, finishes; Ctrl-C during IOIS's epoch 2;
  3. rerun: IOIS resumes with its AAS state; a Ray Train worker is killed mid-epoch, and Ray Train
     restarts the workers from the last checkpoint by itself (train.max_failures); the run finishes.
The tests below read what the three invocations printed and left."""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from cli_utils import ENV, ROOT, descendants, interrupt_after, latest_epoch

from ioisray.aas import quotas
from ioisray.checkpoint import CheckpointStore
from ioisray.cli import main
from ioisray.config import load_config
from ioisray.models.diffusion import create_unet

pytestmark = pytest.mark.ray

BUDGET, EPOCHS = 48, 3
TINY_IOIS = ["model.name=resnet10t", "data.image_size=16", "train.batch_size=16", "ray.num_workers=2",
             f"train.epochs={EPOCHS}", "synthesis.mode=online", f"synthesis.budget={BUDGET}",
             "synthesis.chunk_size=4", "synthesis.pool_size=2", "synthesis.num_cpus=0.5", "sampler.steps=8",
             "aas.temperature=0.1", "train.max_failures=2"]


def _train_workers(pid: int) -> list[int]:
    """The Ray Train worker processes started under `pid`."""
    mine = descendants(pid)
    rows = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.split("\n")[1:]
    return [int(r.split()[0]) for r in rows if "RayTrainWorker" in r and r.split() and int(r.split()[0]) in mine]


def _run_killing_a_worker(args, run: Path, after_epochs: int, log: Path, env: dict) -> tuple[int, str]:
    """Run `ioisray *args` to the end; once `after_epochs` epochs are checkpointed, kill -9 one of its
    Ray Train workers. Returns (exit code, what it printed)."""
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ioisray", *args], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, env={**ENV, **env})
        killed = False
        try:
            deadline = time.time() + 600
            while proc.poll() is None and time.time() < deadline:
                if not killed and latest_epoch(run) >= after_epochs and (workers := _train_workers(proc.pid)):
                    time.sleep(1.0)  # into the next epoch
                    os.kill(workers[-1], signal.SIGKILL)
                    killed = True
                time.sleep(0.2)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert killed, "no Train worker was found to kill:\n" + log.read_text()[-3000:]
    return proc.returncode, log.read_text()


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("job")
    tmpdir = tempfile.mkdtemp(prefix="t", dir="/tmp")  # short: Ray's socket paths live under $TMPDIR
    unet_dir = root / "unet"
    create_unet("tiny", num_classes=10, image_size=16).save_pretrained(unet_dir, safe_serialization=True)
    baseline = root / "ce_tiny.yaml"  # a variant of the main job's baseline, with sampling, mixup and a loss
    baseline.write_text(f"defaults: [{ROOT / 'configs/digits_ce.yaml'}]\nname: ce_tiny\n"  # that Ray Data and
                        "model: {name: resnet10t}\ntrain: {epochs: 4, batch_size: 16}\nray: {num_workers: 0}\n"
                        "method: {sampling: class_balanced, mixup_alpha: 0.2, loss: cb_focal}\n")  # the loop run
    store = root / "store"
    args = ["train", "configs/digits.yaml", *TINY_IOIS, f"diffusion.model_dir={unet_dir}", "name=iois",
            f"output_dir=file://{store}", f"baseline={baseline}"]
    env = {"TMPDIR": tmpdir, "IOISRAY_STAGING": str(root / "staging")}
    base_run, run = store / "ce_tiny", store / "iois"
    # 1. Ctrl-C in the baseline, then its newest checkpoint damaged.
    t0 = time.perf_counter()
    base_done, first = interrupt_after(args, base_run, epochs=2, env=env)
    t1 = time.perf_counter()
    newest = base_run / "checkpoints" / f"epoch_{base_done:05d}" / "state.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    # 2. The baseline resumes and finishes; Ctrl-C in IOIS after its first epoch.
    iois_done, second = interrupt_after(args, run, epochs=1, timeout=480, env=env)
    t2 = time.perf_counter()
    # 3. IOIS resumes; a worker dies mid-epoch; the run finishes.
    code, third = _run_killing_a_worker(args, run, iois_done + 1, root / "third.log", env)
    print(f"job: {t1 - t0:.0f} s, {t2 - t1:.0f} s, {time.perf_counter() - t2:.0f} s")
    leftovers = [p.name for p in Path(tmpdir).iterdir() if p.name.startswith(("ioisray-ckpt", "ioisray-tb"))]
    return {"root": root, "args": args, "run": run, "base_run": base_run, "base_done": base_done, "iois_done": iois_done,
            "first": first, "second": second, "third": third, "code": code, "tmp_leftovers": leftovers}


def test_ctrl_c_says_where_the_run_stopped_and_how_to_resume(job):
    assert f"run ce_tiny interrupted at epoch {job['base_done'] + 1} of 4" in job["first"], job["first"][-3000:]
    assert f"run iois interrupted at epoch {job['iois_done'] + 1} of {EPOCHS}" in job["second"], job["second"][-3000:]
    for printed in (job["first"], job["second"]):
        assert "rerun the same command to resume" in printed and "Traceback" not in printed


def test_the_in_process_baseline_resumes_past_its_damaged_checkpoint_and_finishes_once(job):
    d = job["base_done"]
    second = job["second"]
    assert f"skipping checkpoint epoch_{d:05d}" in second and "does not match its checksum" in second
    assert f"resumed from epoch {d - 1} (checkpoint epoch_{d - 1:05d})" in second
    assert "baseline ce_tiny: training it first" in job["first"] and "training it first" not in job["third"]
    results = json.loads((job["base_run"] / "metrics.json").read_text())
    assert [h["epoch"] for h in results["history"]] == [0, 1, 2, 3]
    assert not job["tmp_leftovers"]  # no temporary checkpoint copies or event folders in $TMPDIR


def test_a_killed_worker_restarts_from_the_last_checkpoint_by_itself(job):
    third = job["third"]
    assert job["code"] == 0, third[-5000:]
    assert f"resumed from epoch {job['iois_done']}" in third
    # After the kill Ray Train restarted the workers, which resumed from the run's newest checkpoint.
    assert third.count("resumed from epoch") >= 2, third[-5000:]
    history = json.loads((job["run"] / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == list(range(EPOCHS))  # every epoch once


def test_iois_streams_each_epochs_quota_with_aas_state_kept_across_every_stop(job):
    run = job["run"]
    history = json.loads((run / "metrics.json").read_text())["history"]
    for h in history:
        # Every image of the epoch's quota reached training, once, with its label.
        assert h["synthetic_per_class"] == h["quotas"] and sum(h["quotas"]) == BUDGET
        assert len(h["images_per_second_per_actor"]) >= 1
    assert history[0]["quotas"] == [5, 5, 5, 5, 5, 5, 5, 5, 4, 4]  # uniform before any accuracy exists
    assert any(h["quotas"] != history[0]["quotas"] for h in history[1:])
    # AAS after the first epoch, across the Ctrl-C and the worker's death: each epoch's quotas follow
    # from the previous epoch's per-class training accuracy, restored from the checkpoint.
    for prev, h in zip(history, history[1:]):
        assert h["quotas"] == quotas(list(prev["train_per_class_accuracy"].values()), BUDGET, 0.1).tolist()
    state = CheckpointStore(run / "checkpoints").load("final")
    for got, want in zip(state.extra["aas"]["accuracy"], history[-1]["train_per_class_accuracy"].values()):
        assert want != want or abs(got - want) < 1e-9  # NaN: class unseen, AAS keeps its previous value
    assert any(h["seconds_to_first_synthetic"] < h["generation_seconds"] for h in history), \
        [(h["seconds_to_first_synthetic"], h["generation_seconds"]) for h in history]
    assert all(h["seconds_to_first_batch"] <= h["seconds_to_first_synthetic"] for h in history)
    assert all(0 < h["seconds_to_first_chunk"] <= h["generation_seconds"] for h in history)


def test_the_runs_outputs_are_on_the_uri(job):
    run, third = job["run"], job["third"]
    results = json.loads((run / "metrics.json").read_text())
    assert np.isfinite(results["test"]["balanced_accuracy"])
    assert results["test"]["num_samples"] == results["splits"]["test"]  # every test image, once
    assert sum(map(sum, results["test"]["confusion_matrix"])) == results["splits"]["test"]
    assert f"results: file://{run}/metrics.json" in third
    for figure in ("real_vs_synthetic.png", "per_class_accuracy_change.png"):
        assert (run / figure).stat().st_size > 1000 and f"figure: file://{run / figure}" in third
    assert len((run / "test_predictions.csv").read_text().splitlines()) == results["splits"]["test"] + 1
    assert list((run / "tensorboard").glob("events.out.tfevents.*")) and "| metric |" in (run / "metrics.md").read_text()
    assert sorted(p.name for p in (run / "checkpoints").iterdir())[-1] == "final" and not (run / ".lock").exists()
    for split in ("val", "test"):
        assert set(results[split]) >= {"accuracy", "balanced_accuracy", "macro_f1", "macro_precision", "mcc",
                                       "auc", "per_class_accuracy", "confusion_matrix"}
    assert load_config(run / "config.yaml").name == "iois"
    from ioisray.recipes.sample import load_classifier_run  # the tested weights, reloadable on their own

    model, _, names = load_classifier_run(run)
    assert names == results["class_names"]


def test_a_finished_run_is_refused_from_a_machine_without_its_local_copy(job, monkeypatch, capsys):
    # The test split has been used: running the same run again is refused (in-process, before Ray
    # starts), results untouched, though the local staging copy is gone (it is read back from the URI).
    results = (job["run"] / "metrics.json").read_text()
    shutil.rmtree(job["root"] / "staging")
    monkeypatch.setenv("IOISRAY_STAGING", str(job["root"] / "staging"))
    monkeypatch.chdir(ROOT)
    capsys.readouterr()
    assert main(job["args"]) == 2
    assert "has finished (its test split was used once already)" in capsys.readouterr().err
    assert (job["run"] / "metrics.json").read_text() == results


def test_the_console_is_quiet(job):
    # Ray's per-report INFO lines and dataset-execution lines stay out of the console.
    for printed in (job["first"], job["second"], job["third"]):
        assert "Reporting training result" not in printed and "execution finished" not in printed
