"""`ioisray evaluate` and `ioisray predict` on a finished run, in-process and without Ray.

The run folder is made by hand, as `ioisray train` leaves it (config.yaml, metrics.json with the class
names and the run's own test metrics, best_model.safetensors), from an untrained 16 px ResNet-18: the
tests check what is written and how classes are matched, not how good the model is.
"""
import csv
import json
import os

import numpy as np
import pytest
import torch
from data_fixtures import make_csv, make_imagefolder, write_corrupt, write_csv, write_image

from ioisray.atomic import atomic_save_safetensors
from ioisray.cli import main
from ioisray.config import load_config, save_config
from ioisray.data import load_dataset, provenance, split_dataset
from ioisray.metrics import classification_metrics
from ioisray.models import build_classifier
from ioisray.models.trained import BEST_MODEL_FILE
from ioisray.run import run_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")
EVAL_FILES = {"metrics.json", "metrics.md", "confusion_matrix.png", "predictions.csv"}


def make_run(tmp_path, class_names, data=(), split_ids=None):
    """A finished run folder of `class_names` (in that order), trained on `data` overrides."""
    cfg = load_config(None, ["model.name=resnet18", "data.image_size=16", f"output_dir={tmp_path / 'out'}",
                             "name=run", *data])
    torch.manual_seed(0)
    run = run_dir(cfg)
    run.mkdir(parents=True)
    atomic_save_safetensors(build_classifier(cfg, len(class_names)).state_dict(), run / BEST_MODEL_FILE)
    save_config(cfg, run / "config.yaml")
    test = classification_metrics([0, 1], np.eye(len(class_names))[[0, 1]], class_names)
    (run / "metrics.json").write_text(json.dumps({"class_names": class_names, "test": test,
                                                  "split_ids": split_ids or {}}))
    (run / "metrics.md").write_text("| metric | test |\n")
    return run


def own_files(run):
    """The run's own results, byte for byte: no evaluation may change them."""
    return {name: (run / name).read_bytes() for name in ("metrics.json", "metrics.md", "config.yaml")}


def read_predictions(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def probabilities(rows, class_names):
    return np.array([[float(r[f"prob_{c}"]) for c in class_names] for r in rows])


def test_evaluate_on_an_imagefolder_with_every_class(tmp_path, capsys):
    folder = make_imagefolder(tmp_path / "skin_folder")
    run = make_run(tmp_path, folder["class_names"])
    before = own_files(run)
    assert main(["evaluate", str(run), "data.name=imagefolder", f"data.root={tmp_path / 'skin_folder'}"]) == 0
    out = run / "eval" / "skin_folder"  # named by the data folder
    assert {p.name for p in out.iterdir()} == EVAL_FILES  # and no temporary file left
    rows = read_predictions(out / "predictions.csv")
    assert len(rows) == folder["n"] and len({r["path"] for r in rows}) == folder["n"]
    assert list(rows[0]) == ["path", "label", "predicted", *(f"prob_{c}" for c in folder["class_names"])]
    assert np.allclose(probabilities(rows, folder["class_names"]).sum(axis=1), 1.0, atol=1e-4)
    assert all(r["label"] == r["path"].split("/")[0] for r in rows)  # relative to data.root: <class>/<file>
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(classification_metrics([0, 1, 2], np.eye(3), list("abc"))) <= set(metrics)
    assert metrics["num_samples"] == folder["n"] and metrics["unknown_classes"] == metrics["missing_classes"] == []
    assert metrics["data_source"] == str(tmp_path / "skin_folder") and metrics["split"] is None
    assert metrics["data"]["image_size"] == 16  # the run's size
    out_text, err = capsys.readouterr()
    assert "balanced_accuracy" in out_text and str(out / "metrics.json") in out_text and "warning" not in err
    assert (out / "metrics.md").read_text().startswith("| metric | skin_folder |")
    assert own_files(run) == before


def test_an_image_listed_twice_is_evaluated_once(tmp_path, capsys):
    # A CSV that lists its 6 images twice (repeated lines): 6 predictions, metrics over 6 images.
    rows = [[f"img{i}.png", "ab"[i % 2]] for i in range(6)]
    for i in range(6):
        write_image(tmp_path / "data" / f"img{i}.png", (40 * i, 200 - 30 * i, 7))
    write_csv(tmp_path / "data" / "labels.csv", ["path", "label"], rows + rows)
    run = make_run(tmp_path, ["a", "b"])
    assert main(["evaluate", str(run), "data.name=csv", f"data.root={tmp_path / 'data'}"]) == 0
    out = run / "eval" / "data"
    assert len(read_predictions(out / "predictions.csv")) == 6
    assert json.loads((out / "metrics.json").read_text())["num_samples"] == 6


def test_classes_are_matched_by_name_and_mismatches_named(tmp_path, capsys):
    make_imagefolder(tmp_path / "folder")  # benign (3 images), malignant (4), normal (2)
    run = make_run(tmp_path, ["malignant", "melanoma", "benign"])
    before = own_files(run)
    data = ["data.name=imagefolder", f"data.root={tmp_path / 'folder'}"]
    assert main(["evaluate", str(run), *data, "--name", "mixed"]) == 0
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if "warning" in line]
    assert len(warning) == 1 and "'normal'" in warning[0] and "'melanoma'" in warning[0]
    assert "2 images left out" in warning[0]
    out = run / "eval" / "mixed"
    assert {p.name for p in out.iterdir()} == EVAL_FILES
    rows = read_predictions(out / "predictions.csv")
    assert len(rows) == 7 and {r["label"] for r in rows} == {"benign", "malignant"}
    assert [c.removeprefix("prob_") for c in list(rows[0])[3:]] == ["malignant", "melanoma", "benign"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rows_left_out"] == {"normal": 2} and metrics["missing_classes"] == ["melanoma"]
    assert metrics["class_mapping"] == {"benign": "benign", "malignant": "malignant", "normal": None}
    assert metrics["support"] == {"malignant": 4, "melanoma": 0, "benign": 3}  # labels remapped by name
    # The same name again overwrites that evaluation; the run's own results stay as they were.
    assert main(["evaluate", str(run), *data, "--name", "mixed"]) == 0
    assert own_files(run) == before

    other = make_run(tmp_path / "other", ["cat", "dog"])
    assert main(["evaluate", str(other), *data]) == 2
    err = capsys.readouterr().err
    assert "shares no class" in err and "'cat'" in err and "'normal'" in err
    assert not (other / "eval").exists()


def test_split_test_evaluates_that_split_of_the_run_data(tmp_path, capsys):
    made = make_csv(tmp_path)  # classes "0", "2", "10"; its own split column holds 2 test images
    data = ["data.name=csv", f"data.csv={made['csv']}"]
    ds = load_dataset("csv", csv=str(made["csv"]), image_size=16)
    test_rows = split_dataset(ds, val_fraction=0.15, test_fraction=0.2, seed=0)["test"]
    test_id = provenance.split_id(provenance.image_keys(ds, test_rows, str(made["csv"].parent)))
    run = make_run(tmp_path, ["10", "0", "2"], data, split_ids={"test": test_id})
    before = own_files(run)
    assert main(["evaluate", str(run), "--split", "test"]) == 0  # the run's own data
    out = run / "eval" / "meta_test"  # labels.csv is named by its folder
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["num_samples"] == len(test_rows) == 2
    assert metrics["same_images_as_run_split"] == "test"
    rows = read_predictions(out / "predictions.csv")
    assert sorted(r["path"] for r in rows) == sorted(  # relative to the CSV's folder, as the run names them
        os.path.relpath(ds.sources[i], made["csv"].parent) for i in test_rows)
    assert [r["label"] for r in rows] == [ds.class_names[ds.labels[i]] for i in test_rows]
    assert main(["evaluate", str(run), *data]) == 0  # every image, not a split
    assert json.loads((run / "eval" / "meta" / "metrics.json").read_text())["same_images_as_run_split"] is None
    assert own_files(run) == before


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    make_imagefolder(tmp_path / "folder")
    corrupt = write_corrupt(tmp_path / "folder" / "benign" / "b.png")
    run = make_run(tmp_path, ["benign", "malignant", "normal"])
    before = own_files(run)
    data = ["data.name=imagefolder", f"data.root={tmp_path / 'folder'}"]
    for args, expected in [
        ([str(run), *data], str(corrupt)),
        ([str(tmp_path / "folder"), *data], "not a finished `ioisray train` run"),
        ([str(run), *data, "data.image_size=32"], "data.image_size"),
        ([str(run), *data, "model.name=resnet50"], "model.name"),
        ([str(run), *data, "--name", "../x"], "--name"),
    ]:
        assert main(["evaluate", *args]) == 2
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1, err
    assert not (run / "eval").exists() and own_files(run) == before


def test_predict_on_a_folder_with_nested_images(tmp_path, capsys):
    folder = make_imagefolder(tmp_path / "unlabelled")  # one image in malignant/nested/, a notes.txt
    extra = write_image(tmp_path / "one.jpg")
    run = make_run(tmp_path, ["benign", "malignant", "normal"])
    before = own_files(run)
    assert main(["predict", str(run), str(tmp_path / "unlabelled"), str(extra)]) == 0
    written = list((run / "predictions").iterdir())
    assert len(written) == 1 and written[0].suffix == ".csv" and str(written[0]) in capsys.readouterr().out
    rows = read_predictions(written[0])
    assert len(rows) == folder["n"] + 1 and rows[-1]["path"] == str(extra)
    assert any(r["path"].endswith("malignant/nested/c.png") for r in rows)
    assert list(rows[0]) == ["path", "predicted", "prob_benign", "prob_malignant", "prob_normal"]
    probs = probabilities(rows, ["benign", "malignant", "normal"])
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    assert [r["predicted"] for r in rows] == [["benign", "malignant", "normal"][i] for i in probs.argmax(axis=1)]
    out = tmp_path / "preds" / "mine.csv"
    assert main(["predict", str(run), str(extra), "--out", str(out)]) == 0
    assert len(read_predictions(out)) == 1 and own_files(run) == before


def test_predict_refuses_unreadable_images_naming_them(tmp_path, capsys):
    make_imagefolder(tmp_path / "unlabelled")
    corrupt = write_corrupt(tmp_path / "unlabelled" / "normal" / "zz.png")
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    run = make_run(tmp_path, ["benign", "malignant", "normal"])
    before = own_files(run)
    for args, expected in [
        ([str(tmp_path / "unlabelled")], str(corrupt)),
        ([str(tmp_path / "missing.png")], str(tmp_path / "missing.png")),
        ([str(fifo)], f"{fifo}: not a regular file"),
        ([str(tmp_path / "unlabelled" / "benign" / "a.png"), "--out", str(run / "metrics.json")], "--out"),
    ]:
        assert main(["predict", str(run), *args]) == 2
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1, err
    assert not (run / "predictions").exists() and own_files(run) == before


@pytest.mark.parametrize("umask, file_mode", [(0o022, 0o644), (0o077, 0o600)])
def test_outputs_follow_the_users_umask(tmp_path, umask, file_mode):
    # On a shared machine colleagues read a run's results: files get the mode open() would give them.
    from ioisray.atomic import temporary_dir

    make_imagefolder(tmp_path / "skin_folder")
    run = make_run(tmp_path, ["benign", "malignant", "normal"])
    before = os.umask(umask)
    try:
        assert main(["evaluate", str(run), "data.name=imagefolder", f"data.root={tmp_path / 'skin_folder'}"]) == 0
        folder = temporary_dir(tmp_path, ".made-")
    finally:
        os.umask(before)
    written = [p for p in (run / "eval").rglob("*") if p.is_file()]
    assert {p.name for p in written} >= {"metrics.json", "predictions.csv"}
    assert {oct(p.stat().st_mode & 0o777) for p in written} == {oct(file_mode)}
    assert folder.stat().st_mode & 0o777 == file_mode | (0o111 & ~umask)  # a folder: rwx where r
