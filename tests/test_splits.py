"""split_dataset: official splits, stratified and grouped splits, duplicates, option validation."""
import dataclasses
import hashlib
import os
import shutil

import numpy as np
import pytest

from data_fixtures import make_dermamnist, make_ham10000_copy, make_ham10000_official, write_csv, write_image
from ioisray.data import DataError, ImageDataset, load_dataset, split_dataset


def make_ds(labels, groups=None, official=None, num_classes=None) -> ImageDataset:
    labels = np.asarray(labels, dtype=np.int64)
    k = num_classes or int(labels.max()) + 1
    return ImageDataset(images=np.zeros((len(labels), 2, 2, 3), np.uint8), labels=labels,
                        class_names=[str(c) for c in range(k)], sources=[f"r{i}" for i in range(len(labels))],
                        groups=None if groups is None else np.asarray(groups, dtype=str),
                        official_split=None if official is None else np.asarray(official, dtype=str))


def grouped_ds(seed=0):
    """Imbalanced classes (200/60/12/3 groups), each group 1..4 images of one class."""
    rng = np.random.default_rng(seed)
    labels, groups = [], []
    for c, n_groups in enumerate([200, 60, 12, 3]):
        for g in range(n_groups):
            size = int(rng.integers(1, 5))
            labels += [c] * size
            groups += [f"c{c}_g{g}"] * size
    return make_ds(labels, groups)


def check_partition(split, n):
    assert set(split) == {"train", "val", "test"}
    for idx in split.values():
        assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0)
    allidx = np.concatenate(list(split.values()))
    assert len(allidx) == n and np.array_equal(np.sort(allidx), np.arange(n))


def test_ungrouped_stratified_split():
    labels = np.repeat([0, 1, 2, 3], [500, 100, 20, 3])
    ds = make_ds(labels)
    split = split_dataset(ds, val_fraction=0.1, test_fraction=0.2, seed=0)
    check_partition(split, len(labels))
    sizes = {k: len(v) for k, v in split.items()}
    assert abs(sizes["test"] - 0.2 * len(labels)) <= 4 and abs(sizes["val"] - 0.1 * len(labels)) <= 4
    for name, frac in (("train", 0.7), ("val", 0.1), ("test", 0.2)):
        counts = np.bincount(labels[split[name]], minlength=4)
        assert (counts > 0).all(), name  # even the 3-image class is in every split
        assert abs(counts[0] - frac * 500) <= 1 and abs(counts[1] - frac * 100) <= 1


def test_grouped_split_keeps_groups_together_and_stratifies():
    ds = grouped_ds()
    split = split_dataset(ds, val_fraction=0.15, test_fraction=0.15, seed=3)
    check_partition(split, len(ds.labels))
    seen = [set(ds.groups[idx]) for idx in split.values()]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    whole = ds.class_counts() / len(ds.labels)
    for name, idx in split.items():
        counts = np.bincount(ds.labels[idx], minlength=4)
        assert (counts > 0).all(), name  # every class (>= 3 groups) in every split
        assert np.abs(counts[:2] / len(idx) - whole[:2]).max() < 0.06  # proportions close
    assert abs(len(split["test"]) / len(ds.labels) - 0.15) < 0.03


def test_split_deterministic_per_seed_and_seed_matters():
    ds = grouped_ds()
    a = split_dataset(ds, val_fraction=0.1, test_fraction=0.2, seed=7)
    b = split_dataset(ds, val_fraction=0.1, test_fraction=0.2, seed=7)
    c = split_dataset(ds, val_fraction=0.1, test_fraction=0.2, seed=8)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["test"], c["test"])


def test_zero_val_fraction_gives_empty_val():
    ds = make_ds(np.repeat([0, 1], [32, 8]))
    split = split_dataset(ds, val_fraction=0.0, test_fraction=0.25, seed=0)
    check_partition(split, 40)
    assert len(split["val"]) == 0 and len(split["test"]) == 10


def test_official_split_used_as_is():
    official = ["train"] * 6 + ["val"] * 2 + ["test"] * 2
    ds = make_ds([0, 1] * 5, official=official)
    split = split_dataset(ds, val_fraction=0.3, test_fraction=0.3, seed=0)
    assert split["train"].tolist() == list(range(6))
    assert split["val"].tolist() == [6, 7] and split["test"].tolist() == [8, 9]


def test_official_split_without_val_carves_from_train():
    official = np.array(["train"] * 80 + ["test"] * 20)
    labels = np.tile([0, 0, 0, 1], 25)
    ds = make_ds(labels, official=official)
    split = split_dataset(ds, val_fraction=0.25, test_fraction=0.2, seed=0)
    check_partition(split, 100)
    assert split["test"].tolist() == list(range(80, 100))  # official test untouched
    assert len(split["val"]) == 20 and split["val"].max() < 80
    assert np.bincount(labels[split["val"]]).tolist() == [15, 5]  # stratified


def test_ham_fixture_end_to_end_no_lesion_leak(tmp_path):
    make_ham10000_official(tmp_path, lesions_per_class=4, images_per_lesion=2)
    ds = load_dataset("ham10000", str(tmp_path), image_size=4)
    split = split_dataset(ds, val_fraction=0.2, test_fraction=0.2, seed=0)
    check_partition(split, len(ds.labels))
    owner = {}
    for name, idx in split.items():
        for lesion in ds.groups[idx]:
            assert owner.setdefault(lesion, name) == name
        assert (np.bincount(ds.labels[idx], minlength=7) > 0).all()  # 4 lesions/class: all present


@pytest.mark.parametrize("val,test,option", [
    (-0.1, 0.2, "val_fraction"), (0.1, 0.0, "test_fraction"), (0.5, 0.5, "val_fraction \\+ test_fraction"),
    (0.1, float("nan"), "test_fraction"),
])
def test_bad_fractions_rejected(val, test, option):
    with pytest.raises(DataError, match=option):
        split_dataset(make_ds([0, 1] * 10), val_fraction=val, test_fraction=test, seed=0)


def write_each_image_twice(root, layout: str, n: int = 30):
    """n distinct images in two classes, each listed twice: a third under another spelling of the
    same path, a third through a symlink (same resolved path), a third as a byte-identical copy under
    another name. layout "csv": root/labels.csv (path,label; no group column); "imagefolder": a tree."""
    rows = []
    for i in range(n):
        folder = "imgs" if layout == "csv" else str(i % 2)
        image = write_image(root / folder / f"img{i}.png", (8 * i, 255 - 8 * i, 100), size=(8, 8))
        if i % 3 == 0 and layout == "csv":
            twin = f"imgs/../imgs/img{i}.png"
        elif i % 3 == 1:
            twin = f"{folder}/link{i}.png"
            (root / twin).symlink_to(image)
        else:
            twin = f"{folder}/copy{i}.png"
            shutil.copyfile(image, root / twin)
        rows += [[f"{folder}/img{i}.png", str(i % 2)], [twin, str(i % 2)]]
    if layout == "csv":
        write_csv(root / "labels.csv", ["path", "label"], rows)


@pytest.mark.parametrize("layout", ["csv", "imagefolder"])
def test_an_image_listed_twice_is_in_one_split_once(tmp_path, layout):
    write_each_image_twice(tmp_path, layout)
    ds = load_dataset(layout, str(tmp_path), image_size=4)
    assert len(ds.labels) == 60 and ds.duplicates == 30 and ds.merged_rows == 30  # every row read
    same_file = [os.path.realpath(s) for s in ds.sources]
    same_bytes = [hashlib.sha1(open(s, "rb").read()).hexdigest() for s in ds.sources]
    image = [same_bytes.index(b) for b in same_bytes]  # the first row of each row's image
    for seed in range(3):
        split = split_dataset(ds, val_fraction=0.2, test_fraction=0.2, seed=seed)
        rows = np.concatenate(list(split.values()))
        # Every image in exactly one split, once: 30 rows, not 60, so that no split's metrics count a
        # copy twice.
        assert len(rows) == len(set(rows)) == 30 and sorted({image[i] for i in rows}) == sorted(set(image))
        for idx in split.values():
            assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0)
        for key in (same_file, same_bytes):
            assert len({key[i] for i in rows}) == 30
    # Evaluating every image of the data (`ioisray evaluate` without --split) counts each once, too.
    assert sorted(image[i] for i in ds.distinct_rows()) == sorted(set(image))


def test_copies_are_merged_after_the_split_so_no_image_changes_split(tmp_path):
    # 60 images, 22 of them listed twice (repeated CSV lines): the 22 are counted once, and every image
    # stays in the split it had when the copies were counted (a run started then resumes on the same
    # split, without an image moving between training and evaluation).
    rows = [[f"img{i}.png", str(i % 2)] for i in range(60)]
    for i in range(60):
        write_image(tmp_path / f"img{i}.png", (4 * i, 255 - 4 * i, 9), size=(8, 8))
    write_csv(tmp_path / "labels.csv", ["path", "label"], rows + rows[:22])
    ds = load_dataset("csv", str(tmp_path), image_size=4)
    assert (len(ds.labels), ds.duplicates, ds.merged_rows) == (82, 22, 22)
    split = split_dataset(ds, val_fraction=0.2, test_fraction=0.3, seed=1)
    counted = split_dataset(dataclasses.replace(ds, first_copy=None), val_fraction=0.2, test_fraction=0.3, seed=1)
    for name in split:
        assert split[name].tolist() == [i for i in counted[name] if i < 60]  # rows 60..81 repeat rows 0..21
    assert sum(map(len, split.values())) == 60


def test_an_image_under_two_labels_keeps_a_row_for_each(tmp_path):
    # Not a repeated row but a conflict in the data (the same image, two diagnoses): nothing merged.
    write_image(tmp_path / "a.png", (1, 2, 3))
    write_image(tmp_path / "b.png", (4, 5, 6))
    write_csv(tmp_path / "labels.csv", ["path", "label"], [["a.png", "x"], ["b.png", "y"], ["./a.png", "y"],
                                                           ["./a.png", "x"]])
    ds = load_dataset("csv", str(tmp_path), image_size=4)
    assert (ds.duplicates, ds.relabelled, ds.merged_rows) == (1, 1, 1)  # line 5 repeats line 2
    assert ds.distinct_rows().tolist() == [0, 1, 2]


def test_the_data_line_says_how_many_rows_were_merged(tmp_path, capsys):
    from ioisray.config import load_config
    from ioisray.data.setup import setup_data

    write_each_image_twice(tmp_path, "csv")
    ds, splits = setup_data(load_config(None, ["data.name=csv", f"data.root={tmp_path}", "data.image_size=8",
                                               "data.val_fraction=0.2", "data.test_fraction=0.2"]))
    line = capsys.readouterr().out
    assert "data csv: 30 images" in line and "30 images listed twice or more" in line
    assert "30 repeated rows merged, each image counted once" in line
    assert sum(map(len, splits.values())) == 30


def test_duplicates_join_the_groups_they_are_in(tmp_path):
    # Two lesions share one image (the same bytes under two names): both lesions are one group now.
    fx = make_ham10000_copy(tmp_path, lesions_per_class=3, images_per_lesion=2)
    shutil.copyfile(fx["paths"][0], fx["paths"][4])  # rows 0 and 4: lesions HAM_0000000 and HAM_0000002
    ds = load_dataset("ham10000", str(tmp_path), image_size=4)
    lesions = np.asarray(fx["lesions"])
    joined = np.isin(lesions, [lesions[0], lesions[4]])
    assert len(set(ds.groups[joined])) == 1 and lesions[0] != lesions[4]
    assert set(ds.groups[joined]).isdisjoint(ds.groups[~joined])
    assert ds.groups[~joined].tolist() == lesions[~joined].tolist()  # the others keep their lesion id


def test_duplicates_in_different_official_splits_are_refused(tmp_path):
    fx = make_dermamnist(tmp_path)  # labels.csv: 14 train rows (lines 2-15), then 7 val, 7 test
    train_image, val_image = tmp_path / "train/akiec/DermaMNIST_train_00000.jpg", tmp_path / "val/akiec/DermaMNIST_val_00000.jpg"
    shutil.copyfile(train_image, val_image)
    with pytest.raises(DataError) as exc:
        load_dataset("dermamnist", str(tmp_path), image_size=4)
    msg = str(exc.value)
    assert str(train_image) in msg and str(val_image) in msg and "\n" not in msg
    assert f"{fx['csv']}, line 2" in msg and "line 16" in msg
    # The same file listed in two splits of a CSV's split column, too.
    write_image(tmp_path / "c" / "a.png", (1, 2, 3))
    write_image(tmp_path / "c" / "b.png", (4, 5, 6))
    write_csv(tmp_path / "c" / "labels.csv", ["path", "label", "split"],
              [["a.png", "x", "train"], ["b.png", "y", "train"], ["./a.png", "x", "test"]])
    with pytest.raises(DataError, match=r"labels\.csv, line 2 .*a\.png.*labels\.csv, line 4 .*a\.png"):
        load_dataset("csv", str(tmp_path / "c"), image_size=4)
