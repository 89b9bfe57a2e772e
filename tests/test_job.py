"""The main job's path end to end, through the real `ioisray` entry point, once for this module: a tiny
IOIS run on the embedded digits that first pretrains its diffusion model (2 Ray Train workers) and trains
its CE baseline (in-process), with outputs on a filesystem URI (as s3://... on a cluster). It is stopped
three ways along the way and must lose nothing:
  1. Ctrl-C during diffusion pretraining; its newest checkpoint is then damaged on disk;
  2. rerun: pretraining resumes from the checkpoint before and saves the model; the baseline trains;
     IOIS starts; SIGTERM after its first epoch, to every process of the command, its Ray's included, as
     systemd and Slurm send it (docker stop, Kubernetes and `timeout` send it to the command only:
     test_tune_cli.py, test_sigterm.py);
  3. rerun: IOIS resumes; a Ray Train worker is killed mid-epoch, and Ray Train restarts the workers from
     the last checkpoint by itself (train.max_failures), AAS state intact; the run finishes.
The tests below read what the three invocations printed and left, and fine-tune the pretrained model."""
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
import torch
from cli_utils import ENV, ROOT, ListenerWatch, descendants, interrupt_after, latest_epoch
from safetensors.torch import save_file

from ioisray.aas import quotas
from ioisray.checkpoint import CheckpointStore
from ioisray.cli import main
from ioisray.config import ModelConfig, load_config
from ioisray.data import provenance
from ioisray.data.setup import setup_data
from ioisray.models import create_classifier
from ioisray.models.diffusion import load_noise_scheduler, load_unet
from ioisray.sampler import SamplerConfig, sample

pytestmark = pytest.mark.ray

BUDGET, EPOCHS, PRETRAIN_EPOCHS = 48, 3, 5
TINY_IOIS = ["model.name=resnet10t", "data.image_size=16", "train.batch_size=16", "ray.num_workers=2",
             f"train.epochs={EPOCHS}", "synthesis.mode=online", f"synthesis.budget={BUDGET}",
             "synthesis.chunk_size=4", "synthesis.pool_size=1", "synthesis.num_cpus=0.5", "sampler.steps=8",
             "aas.temperature=0.1", "train.max_failures=2", "train.keep_checkpoints=true",
             # its diffusion model, pretrained first (diffusion.model_dir unset), 2 batches an epoch
             f"pretrain.epochs={PRETRAIN_EPOCHS}", "pretrain.max_batches_per_epoch=2", "pretrain.sample_every=4",
             "pretrain.sample_steps=2"]


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


def _pretraining_runs(store: Path) -> list[Path]:
    return sorted(store.glob("diffusion_*"))


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("job")
    tmpdir = tempfile.mkdtemp(prefix="t", dir="/tmp")  # short: Ray's socket paths live under $TMPDIR
    baseline = root / "ce_tiny.yaml"  # a variant of the main job's baseline, with sampling, mixup and a loss
    # that Ray Data and the loop run, from "pretrained" weights in timm's format (a file, as offline).
    pretrained = root / "resnet10t_in1k.safetensors"
    save_file(create_classifier(ModelConfig(name="resnet10t"), 1000).state_dict(), str(pretrained))
    baseline.write_text(f"defaults: [{ROOT / 'configs/digits_ce.yaml'}]\nname: ce_tiny\n"
                        f"model: {{name: resnet10t, pretrained_file: {pretrained}}}\n"
                        "train: {epochs: 4, batch_size: 16}\nray: {num_workers: 0}\n"
                        "method: {sampling: class_balanced, mixup_alpha: 0.2, loss: cb_focal}\n")
    store = root / "store"
    args = ["train", "configs/digits.yaml", *TINY_IOIS, "name=iois", f"output_dir=file://{store}",
            f"baseline={baseline}"]
    env = {"TMPDIR": tmpdir, "IOISRAY_STAGING": str(root / "staging")}
    base_run, run = store / "ce_tiny", store / "iois"
    # Every TCP socket the job's processes listen on, checked once a second.
    with ListenerWatch(every=1.0) as listeners:
        # 1. Ctrl-C in diffusion pretraining, then its newest checkpoint damaged.
        t0 = time.perf_counter()
        pre_done, first, first_code = interrupt_after(
            args, store / "pretraining", epochs=2, env=env,
            progress=lambda: max(map(latest_epoch, _pretraining_runs(store)), default=0))
        t1 = time.perf_counter()
        (pre_run,) = _pretraining_runs(store)
        newest = pre_run / "checkpoints" / f"epoch_{pre_done:05d}" / "state.pt"
        newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
        # 2. Pretraining resumes and saves its model; the baseline trains (in the driver); SIGTERM in IOIS
        # (2 Ray Train workers and a synthesis actor), to the command and its Ray.
        iois_done, second, second_code = interrupt_after(args, run, epochs=1, env=env, sig=signal.SIGTERM,
                                                         group=True)
        locks_left = [p for p in (base_run / ".lock", run / ".lock") if p.exists()]  # the baseline's, the job's
        t2 = time.perf_counter()
        # 3. IOIS resumes; a worker dies mid-epoch, one epoch after the resume; the run finishes.
        assert iois_done + 1 < EPOCHS, "stopped too late:\n" + second[-3000:]
        code, third = _run_killing_a_worker(args, run, iois_done + 1, root / "third.log", env)
    print(f"job: {t1 - t0:.0f} s, {t2 - t1:.0f} s, {time.perf_counter() - t2:.0f} s")
    leftovers = [p.name for p in Path(tmpdir).iterdir() if p.name.startswith(("ioisray-ckpt", "ioisray-tb", "pymp-"))]
    return {"root": root, "args": args, "run": run, "base_run": base_run, "pre_run": pre_run, "pre_done": pre_done,
            "iois_done": iois_done, "first": first, "second": second, "third": third, "code": code,
            "first_code": first_code, "second_code": second_code, "locks_left": locks_left,
            "tmp_leftovers": leftovers, "listeners_seen": listeners.seen, "listeners_outside": listeners.outside}


def test_ctrl_c_and_sigterm_say_where_the_run_stopped_and_how_to_resume(job):
    pre = job["pre_run"].name
    assert f"run {pre} interrupted at epoch {job['pre_done'] + 1} of {PRETRAIN_EPOCHS}" in job["first"], \
        job["first"][-3000:]
    # The SIGTERM ended the run's Ray too: the synthesis pool is not waited for (it would be until Ray's
    # client ended the process, 60 s later, with Ray's "Failed to connect to GCS" and no line of ours).
    assert f"stopped by SIGTERM: run iois interrupted at epoch {job['iois_done'] + 1} of {EPOCHS}" in job["second"], \
        job["second"][-3000:]
    for printed in (job["first"], job["second"]):
        assert "rerun the same command to resume" in printed and "Traceback" not in printed
    # 128 + the signal, as a shell reports it; no stack dump from Ray's own SIGTERM handler; the run's
    # locks released (the rerun resumes it: test_the_in_process_baseline_finishes_once_and_iois_resumes).
    assert (job["first_code"], job["second_code"]) == (130, 143)
    assert "SIGTERM received" not in job["second"] and not job["locks_left"], job["locks_left"]


def test_pretraining_resumes_past_its_damaged_checkpoint_and_saves_a_reloadable_model(job):
    d, second, pre_run = job["pre_done"], job["second"], job["pre_run"]
    assert 2 <= d < PRETRAIN_EPOCHS, "interrupted too late:\n" + job["first"][-3000:]
    assert f"skipping checkpoint epoch_{d:05d}" in second and "does not match its checksum" in second
    assert f"resumed diffusion pretraining from epoch {d - 1} (checkpoint epoch_{d - 1:05d})" in second
    assert f"diffusion epoch {d}/{PRETRAIN_EPOCHS}" in second  # the damaged epoch again, not the ones before
    assert f"diffusion epoch {d - 1}/{PRETRAIN_EPOCHS}" not in second
    assert "pretraining the diffusion model first" not in job["third"]  # the rerun uses the model it saved
    unet = load_unet(str(pre_run / "unet"), num_classes=10)
    schedule = load_noise_scheduler(pre_run / "unet")  # the model says how it was trained
    assert (schedule.config.prediction_type, schedule.config.beta_schedule) == ("v_prediction", "squaredcos_cap_v2")
    batch = sample(unet, [0, 9], [1, 2], SamplerConfig(steps=2), scheduler=schedule, output_size=24)
    assert batch.images.shape == (2, 24, 24, 3) and batch.images.dtype == torch.uint8
    assert list((pre_run / "tensorboard").glob("events.out.tfevents.*"))
    # It records the images it trained on: the training split, none of the held-out ones.
    assert provenance.training_images(pre_run / "unet") == _training_split_keys()


def _training_split_keys() -> set:
    ds, splits = setup_data(load_config(ROOT / "configs/digits.yaml"))
    return set(provenance.image_keys(ds, splits["train"], None))


def test_fine_tuning_starts_from_the_model_and_keeps_its_schedule(job, tmp_path, monkeypatch, capsys):
    # After one 1-batch epoch at a tiny lr the fine-tuned model is still close to where it started.
    unet_dir = job["pre_run"] / "unet"
    common = ["pretrain-diffusion", "configs/pretrain_digits.yaml", "diffusion.image_size=16", "pretrain.epochs=1",
              "pretrain.max_batches_per_epoch=1", "pretrain.sample_every=0", f"output_dir={tmp_path}"]
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # as the subprocesses' (cli_utils.ENV)
    # In this process, training in it too: neither a Python nor a Train worker start-up.
    assert main([*common, "pretrain.lr=1e-7", "ray.num_workers=0", f"diffusion.model_dir={unet_dir}", "name=ft",
                 "pretrain.epochs=2", "pretrain.snapshot_every=1"]) == 0
    before = load_unet(str(unet_dir), num_classes=10).state_dict()
    after = load_unet(str(tmp_path / "ft" / "unet"), num_classes=10).state_dict()
    assert max((before[k] - after[k]).abs().max().item() for k in before) < 1e-3
    # The EMA model after epoch 1 was kept as a model folder of its own; the last epoch's is the run's unet.
    assert sorted(p.name for p in (tmp_path / "ft" / "snapshots").iterdir()) == ["epoch_00001"]
    assert not (tmp_path / "ft" / "checkpoints").exists()  # finished: the model folder is what stays
    snapshot = load_unet(str(tmp_path / "ft" / "snapshots" / "epoch_00001"), num_classes=10).state_dict()
    assert max((snapshot[k] - after[k]).abs().max().item() for k in before) < 1e-3
    assert provenance.training_images(tmp_path / "ft" / "snapshots" / "epoch_00001") == _training_split_keys()
    assert load_noise_scheduler(tmp_path / "ft" / "unet").config.prediction_type == "v_prediction"
    assert provenance.training_images(tmp_path / "ft" / "unet") == _training_split_keys()  # same split
    # Each of these is refused before anything starts.
    capsys.readouterr()
    # A finished pretraining run is not silently redone.
    assert main([*common, f"diffusion.model_dir={unet_dir}", "name=ft"]) == 2
    assert "already exists" in capsys.readouterr().err
    # Asking to fine-tune it as an epsilon model is refused, naming the key.
    assert main([*common, "diffusion.prediction_type=epsilon", f"diffusion.model_dir={unet_dir}", "name=ft3"]) == 2
    assert "diffusion.prediction_type='epsilon'" in capsys.readouterr().err
    # A model of another image size is refused before Ray starts, naming the key.
    assert main([*common, "diffusion.image_size=32", f"diffusion.model_dir={unet_dir}", "name=ft2"]) == 2
    err = capsys.readouterr().err
    assert "diffusion.model_dir" in err and "16px" in err


def test_the_in_process_baseline_finishes_once_and_iois_resumes(job):
    d = job["iois_done"]
    assert "baseline ce_tiny: training it first" in job["second"]
    assert f"model resnet10t: timm's pretrained weights ({job['root'] / 'resnet10t_in1k.safetensors'})" in job["second"]
    assert "ce_tiny" not in job["third"].split("test balanced accuracy")[0]  # finished: not trained again
    assert f"[iois] resumed from epoch {d} (checkpoint epoch_{d:05d})" in job["third"]
    results = json.loads((job["base_run"] / "metrics.json").read_text())
    assert [h["epoch"] for h in results["history"]] == [0, 1, 2, 3]
    # Finished: its checkpoints are gone (the default), its weights stay; the IOIS run keeps its own.
    assert not (job["base_run"] / "checkpoints").exists() and (job["base_run"] / "best_model.safetensors").is_file()
    assert CheckpointStore(job["run"] / "checkpoints").complete("final")
    # No temporary checkpoint copies, event folders or multiprocessing folders (Ray's dashboard's) in $TMPDIR.
    assert not job["tmp_leftovers"], job["tmp_leftovers"]


def test_evaluate_reproduces_the_runs_own_test_predictions_exactly(job, tmp_path):
    # The baseline trained with mixed precision where the CPU has it natively and channels_last; its
    # test split at the end of training and `ioisray evaluate --split test` of its weights must agree
    # byte for byte: the same images, order, preprocessing, memory format and (float32) precision.
    run = job["base_run"]
    r = subprocess.run([sys.executable, "-m", "ioisray.cli", "evaluate", str(run), "--split", "test", "--name", "t"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    own, again = (run / "test_predictions.csv").read_text(), (run / "eval" / "t" / "predictions.csv").read_text()
    assert own.splitlines()[0].startswith("path,label,predicted,prob_0,")
    assert own.splitlines()[1].startswith("sklearn-digits[")  # the embedded data's own names for its images
    assert own == again
    results, evaluated = (json.loads(p.read_text()) for p in (run / "metrics.json", run / "eval" / "t" / "metrics.json"))
    assert evaluated["same_images_as_run_split"] == "test"
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "auc", "confusion_matrix"):
        assert results["test"][key] == evaluated[key], key


def test_a_killed_worker_restarts_from_the_last_checkpoint_by_itself(job):
    third = job["third"]
    assert job["code"] == 0, third[-5000:]
    # After the kill (once IOIS's first epoch was saved) Ray Train restarted the workers, which resumed
    # from the run's newest checkpoint.
    assert f"resumed from epoch {job['iois_done'] + 1}" in third[third.index("synthesis: quotas"):], third[-5000:]
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
    # AAS after the first epoch, across the worker's death: each epoch's quotas follow
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
    from ioisray.models.trained import load_classifier_run  # the tested weights, reloadable on their own

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


def test_nothing_the_job_starts_listens_beyond_loopback(job):
    # Its private Ray listens on 127.0.0.1 only, and so does the process group of its two Ray Train
    # workers (pretraining and IOIS): the rendezvous store, which torch would bind to every interface.
    assert "ray::RayTrainWo" in job["listeners_seen"], job["listeners_seen"]  # the store was seen
    assert not job["listeners_outside"], job["listeners_outside"]


def test_the_console_is_quiet(job):
    # Ray's per-report INFO lines and dataset-execution lines stay out of the console.
    for printed in (job["first"], job["second"], job["third"]):
        assert "Reporting training result" not in printed and "execution finished" not in printed


def test_the_console_says_which_run_each_line_is_of_and_ends_with_the_comparison(job):
    first, second, third = job["first"], job["second"], job["third"]
    pre = job["pre_run"].name
    # Each phase is announced, with what it will do; each run's lines carry its name.
    assert (f"[iois] diffusion.model_dir is not set: pretraining the diffusion model first, {PRETRAIN_EPOCHS} "
            f"epochs on the 324 training images") in first
    assert f"[{pre}] diffusion epoch 1/{PRETRAIN_EPOCHS} loss" in first and "left)" in first
    assert "[iois] baseline ce_tiny: training it first, 4 epochs" in second
    assert "[ce_tiny] training resnet10t with cb_focal + class-balanced sampling, mixup 0.2: 4 epochs" in second
    assert "[ce_tiny] epoch 1/4 loss" in second
    assert f"[iois] training resnet10t with IOIS ({BUDGET} synthetic images an epoch from 1 synthesis actor), ce:" in third
    assert "on 2 Ray Train workers" in third and f"[iois] epoch {EPOCHS}/{EPOCHS} loss" in third
    assert "[iois] starting 2 Ray Train workers (each {'CPU': " in third
    # The job's answer, in one line: its test figures next to the baseline's.
    results = json.loads((job["run"] / "metrics.json").read_text())["test"]
    base = json.loads((job["base_run"] / "metrics.json").read_text())["test"]
    assert (f"[iois] test balanced accuracy: iois {results['balanced_accuracy']:.3f}, baseline ce_tiny "
            f"{base['balanced_accuracy']:.3f}; test macro-F1: iois {results['macro_f1']:.3f}") in third
