"""`ioisray pretrain-diffusion` end to end on Ray: resume after Ctrl-C, a model diffusers reloads."""
import pytest
import torch
from cli_utils import ROOT, interrupt_after, run_cli

from ioisray.cli import main
from ioisray.config import load_config
from ioisray.data import provenance
from ioisray.models.diffusion import load_noise_scheduler, load_unet
from ioisray.data.setup import setup_data
from ioisray.sampler import SamplerConfig, sample

pytestmark = pytest.mark.ray
EPOCHS = 12  # of 2 batches each: enough that Ctrl-C after the first lands before the last


def test_pretraining_resumes_and_saves_a_reloadable_model(tmp_path, capsys, monkeypatch):
    common = ["pretrain-diffusion", "configs/pretrain_digits.yaml", "diffusion.image_size=16",
              f"pretrain.epochs={EPOCHS}", "pretrain.max_batches_per_epoch=2", "pretrain.sample_every=6",
              "pretrain.sample_steps=2",
              "ray.num_workers=2"]
    args = common + ["diffusion.prediction_type=v_prediction", "diffusion.beta_schedule=squaredcos_cap_v2",
                     "name=pd", f"output_dir={tmp_path}"]
    run = tmp_path / "pd"
    done, _ = interrupt_after(args, run, epochs=1)
    assert not (run / "unet").exists() and 1 <= done < EPOCHS, "interrupted too late"
    r = run_cli(*args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"resumed diffusion pretraining from epoch {done}" in r.stdout + r.stderr
    assert f"diffusion epoch {done}/{EPOCHS}" not in r.stdout + r.stderr  # finished epochs are not redone
    assert (run / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    unet = load_unet(str(run / "unet"), num_classes=10)
    schedule = load_noise_scheduler(run / "unet")  # the model says how it was trained
    assert (schedule.config.prediction_type, schedule.config.beta_schedule) == ("v_prediction", "squaredcos_cap_v2")
    batch = sample(unet, [0, 9], [1, 2], SamplerConfig(steps=2), scheduler=schedule, output_size=24)
    assert batch.images.shape == (2, 24, 24, 3) and batch.images.dtype == torch.uint8
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    # It records the images it trained on: the training split, none of the held-out ones.
    ds, splits = setup_data(load_config(ROOT / "configs/pretrain_digits.yaml"))
    trained_on = set(provenance.image_keys(ds, splits["train"], None))
    assert provenance.training_images(run / "unet") == trained_on

    # Fine-tuning starts from the given model and keeps its schedule: after one 1-batch epoch at a
    # tiny lr it is still close.
    tuned = run_cli(*common, "pretrain.epochs=1", "pretrain.max_batches_per_epoch=1", "pretrain.lr=1e-7",
                    "pretrain.sample_every=0", "ray.num_workers=0",  # in-process: skips Train's worker start-up
                    f"diffusion.model_dir={run / 'unet'}", "name=ft",
                    f"output_dir={tmp_path}")
    assert tuned.returncode == 0, tuned.stdout[-3000:] + tuned.stderr[-3000:]
    before, after = unet.state_dict(), load_unet(str(tmp_path / "ft" / "unet"), num_classes=10).state_dict()
    assert max((before[k] - after[k]).abs().max().item() for k in before) < 1e-3
    assert load_noise_scheduler(tmp_path / "ft" / "unet").config.prediction_type == "v_prediction"
    assert provenance.training_images(tmp_path / "ft" / "unet") == trained_on  # same split: same images
    # In-process from here: each is refused before anything starts.
    monkeypatch.chdir(ROOT)
    capsys.readouterr()
    # A finished pretraining run is not silently redone.
    assert main(args) == 2 and "already exists" in capsys.readouterr().err
    # Asking to fine-tune it as an epsilon model is refused, naming the key.
    assert main([*common, "diffusion.prediction_type=epsilon", f"diffusion.model_dir={run / 'unet'}",
                 "name=ft3", f"output_dir={tmp_path}"]) == 2
    assert "diffusion.prediction_type='epsilon'" in capsys.readouterr().err
    # A model of another image size is refused before Ray starts, naming the key.
    assert main([*common, "diffusion.image_size=32", f"diffusion.model_dir={run / 'unet'}", "name=ft2",
                 f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "diffusion.model_dir" in err and "16px" in err
