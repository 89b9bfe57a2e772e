"""IOIS end to end through the real `ioisray` entry point: a tiny run on the embedded digits, with a
diffusion model (random weights: what is tested is the plumbing, not image quality), 2 Ray Train
workers and 2 synthesis actors, interrupted after its first epoch and resumed."""
import json

import numpy as np
import pytest
from cli_utils import ROOT, interrupt_after, run_cli

from ioisray.aas import quotas
from ioisray.checkpoint import CheckpointStore
from ioisray.models.diffusion import create_unet

pytestmark = pytest.mark.ray

BUDGET = 48
TINY_IOIS = ["model.name=resnet10t", "data.image_size=16", "train.batch_size=16", "ray.num_workers=2",
             "train.epochs=3", "synthesis.mode=online", f"synthesis.budget={BUDGET}",
             "synthesis.chunk_size=4", "synthesis.pool_size=2", "synthesis.num_cpus=0.5", "sampler.steps=12",
             "aas.temperature=0.1"]


def test_iois_run_streams_each_epochs_quota_and_resumes_with_its_aas_state(tmp_path):
    unet_dir = tmp_path / "unet"
    create_unet("tiny", num_classes=10, image_size=16).save_pretrained(unet_dir, safe_serialization=True)
    # Its CE baseline, a 1-epoch variant of the main job's, is trained first (for the per-class change
    # figure); in-process (`ray.num_workers: 0`), which skips Train's worker start-up.
    baseline = tmp_path / "ce_tiny.yaml"
    baseline.write_text(f"defaults: [{ROOT / 'configs/digits_ce.yaml'}]\nname: ce_tiny\n"
                        "model: {name: resnet10t}\ntrain: {epochs: 1, batch_size: 16}\nray: {num_workers: 0}\n")
    args = ["train", "configs/digits.yaml", *TINY_IOIS, f"diffusion.model_dir={unet_dir}", "name=iois",
            f"output_dir={tmp_path}", f"baseline={baseline}"]
    run = tmp_path / "iois"
    done, _ = interrupt_after(args, run, epochs=1, timeout=480)  # epoch 1 also starts the pool
    assert 1 <= done < 3 and not (run / "metrics.json").exists(), "interrupted too late: the run had finished"
    r = run_cli(*args)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert f"resumed from epoch {done}" in out
    assert (tmp_path / "ce_tiny" / "metrics.json").is_file() and "training it first" not in out  # made once

    history = json.loads((run / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    for h in history:
        # Every image of the epoch's quota reached training, once, with its label.
        assert h["synthetic_per_class"] == h["quotas"] and sum(h["quotas"]) == BUDGET
        assert h["actors_started"] == 2 and len(h["images_per_second_per_actor"]) == 2
    assert history[0]["quotas"] == [5, 5, 5, 5, 5, 5, 5, 5, 4, 4]  # uniform before any accuracy exists
    # AAS after the first epoch, including the one right after the resume: quotas follow from the
    # previous epoch's per-class training accuracy, restored from the checkpoint.
    for prev, h in zip(history, history[1:]):
        acc = list(prev["train_per_class_accuracy"].values())
        assert h["quotas"] == quotas(acc, BUDGET, 0.1).tolist()
    # The final checkpoint's AAS state is the last epoch's per-class training accuracy.
    state = CheckpointStore(run / "checkpoints").load("final")
    for got, want in zip(state.extra["aas"]["accuracy"], history[-1]["train_per_class_accuracy"].values()):
        assert want != want or abs(got - want) < 1e-9  # NaN: class unseen, AAS keeps its previous value
    assert any(h["quotas"] != history[0]["quotas"] for h in history[1:])
    # Streaming: in some epoch the first synthetic batch reached a worker before generation ended.
    assert any(h["seconds_to_first_synthetic"] < h["generation_seconds"] for h in history), \
        [(h["seconds_to_first_synthetic"], h["generation_seconds"]) for h in history]
    assert all(h["seconds_to_first_batch"] <= h["seconds_to_first_synthetic"] for h in history)
    assert all(0 < h["seconds_to_first_chunk"] <= h["generation_seconds"] for h in history)
    for figure in ("real_vs_synthetic.png", "per_class_accuracy_change.png"):
        assert (run / figure).stat().st_size > 1000 and f"figure: {run / figure}" in r.stdout
    assert "balanced_accuracy" in (run / "metrics.md").read_text()
    assert np.isfinite(json.loads((run / "metrics.json").read_text())["test"]["balanced_accuracy"])
