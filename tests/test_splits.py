"""split_dataset: official splits, stratified and grouped splits, option validation."""
import numpy as np
import pytest

from data_fixtures import make_ham10000_official
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
