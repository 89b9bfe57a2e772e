"""No run samples from a diffusion model that was trained on its validation or test images."""
import json
import shutil

import numpy as np
import pytest
from cli_utils import ROOT
from data_fixtures import make_ham10000_official

from ioisray.cli import main
from ioisray.config import load_config
from ioisray.data import load_dataset, provenance, split_dataset
from ioisray.models.diffusion import create_unet
from ioisray.data.setup import setup_data
from ioisray.recipes.pretrain_diffusion import record_training_images
from ioisray.recipes.prerequisites import check_same_test_split, diffusion_model

DIGITS = str(ROOT / "configs/digits.yaml")


def test_image_keys_do_not_depend_on_where_the_dataset_folder_is(tmp_path):
    make_ham10000_official(tmp_path / "a", lesions_per_class=2)
    shutil.copytree(tmp_path / "a", tmp_path / "moved")
    here, there = (load_dataset("ham10000", str(tmp_path / d), image_size=4) for d in ("a", "moved"))
    split = split_dataset(here, val_fraction=0.2, test_fraction=0.2, seed=0)
    keys = provenance.image_keys(here, split["train"], str(tmp_path / "a"))
    assert keys == provenance.image_keys(there, split["train"], str(tmp_path / "moved"))
    held_out = provenance.image_keys(here, np.concatenate([split["val"], split["test"]]), str(tmp_path / "a"))
    assert len(set(keys)) == len(split["train"]) and not set(keys) & set(held_out)

    provenance.write_training_images(tmp_path / "unet", "ham10000", keys)
    assert provenance.check_record(tmp_path / "unet", keys, held_out) is None
    leaked = provenance.check_record(tmp_path / "unet", keys, held_out[:2] + keys[:3])
    assert "trained on 3 of this run's 5 validation and test images" in leaked
    # No record, or a record naming none of the run's images (another layout of the same data?): a warning.
    assert provenance.check_record(tmp_path / "empty", keys, held_out).startswith("warning: ")
    assert provenance.check_record(tmp_path / "unet", held_out, held_out[:0]).startswith("warning: ")


def test_medmnist_npz_image_keys_do_not_depend_on_the_working_directory(tmp_path, monkeypatch):
    arrays = {}
    for split in ("train", "val", "test"):
        arrays.update({f"{split}_images": np.zeros((7, 28, 28, 3), np.uint8),
                       f"{split}_labels": np.arange(7)[:, None]})
    np.savez(tmp_path / "dermamnist.npz", **arrays)
    keys = set()
    for cwd, root in ((tmp_path, "dermamnist.npz"), (tmp_path.parent, tmp_path), (ROOT, tmp_path / "dermamnist.npz")):
        monkeypatch.chdir(cwd)
        cfg = load_config(None, ["data.name=dermamnist", f"data.root={root}", "data.image_size=8"])
        ds, splits = setup_data(cfg)
        keys.add(tuple(provenance.image_keys(ds, splits["test"], provenance.data_folder(cfg.data))))
    assert len(keys) == 1 and len(next(iter(keys))) == 7


def test_the_split_seed_fixes_the_split_whatever_the_training_seed():
    def split(*overrides):
        return setup_data(load_config(DIGITS, list(overrides)))[1]["test"]

    assert not np.array_equal(split("seed=0"), split("seed=1"))  # by default the seed fixes the split
    np.testing.assert_array_equal(split("seed=0"), split("seed=1", "data.split_seed=0"))


def _model_trained_on(cfg, rows, path):
    ds, splits = setup_data(cfg)
    create_unet("tiny", ds.num_classes, image_size=16).save_pretrained(path, safe_serialization=True)
    provenance.write_training_images(path, cfg.data.name, provenance.image_keys(ds, splits[rows], None))
    return path


def test_a_model_that_saw_the_runs_held_out_images_is_refused(tmp_path, capsys):
    seed0 = load_config(DIGITS, [f"output_dir={tmp_path}"])
    unet = _model_trained_on(seed0, "train", tmp_path / "unet")
    # Its own split: accepted.
    assert diffusion_model(seed0.model_copy(update={"diffusion": seed0.diffusion.model_copy(
        update={"model_dir": str(unet)})}), *setup_data(seed0)) == str(unet)
    # Seed 1 splits the digits differently: some of its test images are in the model's training split.
    args = ["train", DIGITS, "seed=1", f"diffusion.model_dir={unet}", f"output_dir={tmp_path}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "diffusion.model_dir" in err and "validation and test images" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet"]  # refused before anything was made
    # The same training seed over the model's split is accepted (checked up to the point Ray would start).
    cfg1 = load_config(DIGITS, ["seed=1", "data.split_seed=0", f"diffusion.model_dir={unet}"])
    assert diffusion_model(cfg1, *setup_data(cfg1)) == str(unet)


def test_a_model_without_a_record_is_used_with_a_warning(tmp_path, capsys):
    cfg = load_config(DIGITS, [f"output_dir={tmp_path}"])
    ds, splits = setup_data(cfg)
    create_unet("tiny", ds.num_classes, image_size=16).save_pretrained(tmp_path / "unet", safe_serialization=True)
    cfg = cfg.model_copy(update={"diffusion": cfg.diffusion.model_copy(update={"model_dir": str(tmp_path / "unet")})})
    assert diffusion_model(cfg, ds, splits) == str(tmp_path / "unet")
    assert "cannot be checked" in capsys.readouterr().out


def test_a_damaged_record_is_an_error_naming_the_file(tmp_path):
    (tmp_path / provenance.TRAINING_IMAGES_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=provenance.TRAINING_IMAGES_FILE):
        provenance.training_images(tmp_path)


def test_fine_tuning_records_the_starting_models_images_too(tmp_path):
    cfg = load_config(DIGITS, [f"diffusion.model_dir={tmp_path / 'start'}"])
    ds, splits = setup_data(cfg)
    provenance.write_training_images(tmp_path / "start", "elsewhere", ["00000000000000aa"])
    record_training_images(cfg, ds, splits["train"], tmp_path / "tuned")
    ours = set(provenance.image_keys(ds, splits["train"], None))
    assert provenance.training_images(tmp_path / "tuned") == ours | {"00000000000000aa"}
    # A starting model without a record: the fine-tuned one gets none (a partial one would vouch wrongly).
    (tmp_path / "start" / provenance.TRAINING_IMAGES_FILE).unlink()
    record_training_images(cfg, ds, splits["train"], tmp_path / "tuned2")
    assert provenance.training_images(tmp_path / "tuned2") is None


def test_a_baseline_tested_on_other_images_is_refused_before_training(tmp_path, capsys):
    # A finished baseline run of another split (here its recorded test split id): the per-class change
    # figure would compare accuracies on different test images.
    base = tmp_path / "digits_ce"
    base.mkdir()
    (base / "metrics.json").write_text(json.dumps({"split_ids": {"test": "0123abcd"}}))
    args = ["train", str(ROOT / "configs/digits_ce.yaml"), f"baseline={base}", f"output_dir={tmp_path}", "name=run"]
    assert main(args) == 2
    assert "another test split" in capsys.readouterr().err and not (tmp_path / "run").exists()
    # The same run's own test split id is accepted.
    cfg = load_config(args[1], args[2:])
    ds, splits = setup_data(cfg)
    test_id = provenance.split_id(provenance.image_keys(ds, splits["test"], None))
    (base / "metrics.json").write_text(json.dumps({"split_ids": {"test": test_id}}))
    check_same_test_split(base, test_id)
