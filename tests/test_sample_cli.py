"""`ioisray sample`: a grid from a saved diffusers model; the model must match the data's classes."""
import json

import numpy as np
from cli_utils import ROOT
from PIL import Image

from ioisray.cli import main
from ioisray.models.diffusion import create_unet

DIGITS = str(ROOT / "configs/digits_ce.yaml")


def saved_unet(path, num_classes):
    create_unet("tiny", num_classes, image_size=16).save_pretrained(path, safe_serialization=True)
    return path


def test_sample_writes_each_image_a_labelled_grid_and_the_seeds(tmp_path, capsys):
    unet = saved_unet(tmp_path / "unet", 10)
    args = ["sample", DIGITS, "--per-class", "2", f"diffusion.model_dir={unet}", "data.image_size=16",
            "sampler.steps=2", f"output_dir={tmp_path}", "name=s"]
    assert main(args) == 0
    out = tmp_path / "s" / "samples"
    meta = json.loads((out / "samples.json").read_text())
    assert meta["labels"] == [c for c in range(10) for _ in range(2)] and meta["seeds"] == list(range(20))
    assert meta["files"][:3] == ["images/0_seed0.png", "images/0_seed1.png", "images/1_seed2.png"]
    images = [np.asarray(Image.open(out / f)) for f in meta["files"]]
    assert all(im.shape == (16, 16, 3) for im in images) and len(images) == 20
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(f.split("/")[1] for f in meta["files"])
    # The grid: 10 rows of 2 tiles enlarged 4x (64 px + 2 px padding), after a column of class names.
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape[0] == 10 * 66 + 2 and (grid.shape[1] - 2 * 66 - 2) > 0
    label_w = grid.shape[1] - 2 * 66 - 2
    assert (grid[2:66, label_w + 2:label_w + 66] == np.kron(images[0], np.ones((4, 4, 1), np.uint8))).all()
    assert (grid[2:66, :label_w] < 128).any()  # the class name, written in black at the row's left
    assert "sampling" in capsys.readouterr().err  # the progress bar


def test_model_of_another_class_count_is_an_error(tmp_path, capsys):
    unet = saved_unet(tmp_path / "unet7", 7)
    assert main(["sample", DIGITS, f"diffusion.model_dir={unet}", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "7 classes" in err and "10" in err and str(unet) in err
    assert main(["sample", DIGITS, f"output_dir={tmp_path}"]) == 2
    assert "diffusion.model_dir" in capsys.readouterr().err
    assert main(["sample", DIGITS, f"diffusion.model_dir={saved_unet(tmp_path / 'u10', 10)}",
                 f"--guide-run={tmp_path / 'no_run'}", f"output_dir={tmp_path}"]) == 2
    assert "not a finished" in capsys.readouterr().err


def test_cfg_scale_samples_from_a_model_with_a_null_class_and_refuses_one_without(tmp_path, capsys):
    from ioisray.models.diffusion import save_diffusion_model
    from ioisray.sampler import make_train_scheduler

    with_null = tmp_path / "cfg_unet"
    save_diffusion_model(create_unet("tiny", 10, image_size=16, null_class_label=True), make_train_scheduler(),
                         with_null)
    args = ["sample", DIGITS, "--per-class", "1", "data.image_size=16", "sampler.steps=2", "sampler.cfg_scale=3",
            f"output_dir={tmp_path}", "name=s"]
    assert main(args + [f"diffusion.model_dir={with_null}"]) == 0
    meta = json.loads((tmp_path / "s" / "samples" / "samples.json").read_text())
    assert meta["sampler"]["cfg_scale"] == 3.0 and meta["labels"] == list(range(10))
    plain = saved_unet(tmp_path / "plain", 10)
    assert main(args + [f"diffusion.model_dir={plain}"]) == 2
    err = capsys.readouterr().err
    assert "sampler.cfg_scale=3" in err and str(plain) in err and "null class" in err
