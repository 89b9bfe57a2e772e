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


def test_sample_writes_a_grid_and_the_seeds(tmp_path):
    unet = saved_unet(tmp_path / "unet", 10)
    args = ["sample", DIGITS, "--per-class", "2", f"diffusion.model_dir={unet}", "data.image_size=16",
            "sampler.steps=2", f"output_dir={tmp_path}", "name=s"]
    assert main(args) == 0
    grid = np.asarray(Image.open(tmp_path / "s" / "samples" / "grid.png"))
    assert grid.shape == (10 * 18 + 2, 2 * 18 + 2, 3)  # 10 rows of 2 images, 16 px + 2 px padding
    meta = json.loads((tmp_path / "s" / "samples" / "samples.json").read_text())
    assert meta["labels"] == [c for c in range(10) for _ in range(2)] and meta["seeds"] == list(range(20))


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
