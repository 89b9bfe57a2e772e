"""Loaders on tiny fixtures in each real layout (see data_fixtures.py)."""
import math
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_fixtures import (APTOS_CLASSES, HAM_CLASSES, class_color, make_aptos_copy, make_aptos_official,
                           make_csv, make_dermamnist, make_ham10000_copy, make_ham10000_official,
                           make_imagefolder, write_corrupt, write_csv, write_image)
from ioisray.data import LOADERS, DataError, ImageDataset, decode_image, load_dataset


def check_basic(ds: ImageDataset, n: int, size: int, class_names: list[str]):
    assert ds.images.shape == (n, size, size, 3) and ds.images.dtype == np.uint8
    assert ds.labels.shape == (n,) and ds.labels.dtype == np.int64
    assert ds.class_names == class_names and ds.num_classes == len(class_names)
    assert len(ds.sources) == n and ds.skipped == []


def test_loader_registry_names():
    assert set(LOADERS) == {"digits_lt", "ham10000", "aptos", "dermamnist", "imagefolder", "csv"}
    with pytest.raises(DataError, match="unknown dataset 'nope'"):
        load_dataset("nope", "/x", image_size=8)


def test_load_dataset_dispatches_through_the_registry(monkeypatch):
    # A registered loader gets only the options its signature declares; a root without a default
    # means the dataset needs one (a registry, so a new layout needs no if-chain naming each dataset).
    from ioisray.data.loaders import register

    calls = []

    def toy(root, *, image_size, seed=0):
        calls.append((root, image_size, seed))
        return ImageDataset(images=np.zeros((1, image_size, image_size, 3), np.uint8),
                            labels=np.zeros(1, np.int64), class_names=["a"], sources=["toy[0]"])

    monkeypatch.setitem(LOADERS, "toy", toy)  # restored after the test
    assert register("toy")(toy) is toy and LOADERS["toy"] is toy
    ds = load_dataset("toy", "/r", image_size=8, seed=3, csv="ignored.csv", num_threads=2)
    assert calls == [("/r", 8, 3)] and ds.sources == ["toy[0]"]
    with pytest.raises(DataError, match="dataset 'toy' needs a root directory"):
        load_dataset("toy", image_size=8)


# --- digits_lt --------------------------------------------------------------------------------

@pytest.mark.parametrize("ratio", [50.0, 10.0])
def test_digits_lt_follows_exponential_profile(ratio):
    ds = load_dataset("digits_lt", image_size=12, imbalance_ratio=ratio, seed=0)
    counts = ds.class_counts()
    from sklearn.datasets import load_digits
    n_max = int(np.bincount(load_digits().target).min())  # the smallest full class
    expected = [max(1, math.floor(n_max * ratio ** (-c / 9) + 1e-9)) for c in range(10)]
    assert counts.tolist() == expected
    # Head/tail ratio is the requested one up to flooring of the tail count.
    assert counts[0] == n_max and counts[0] / (counts[9] + 1) < ratio <= counts[0] / counts[9]
    assert np.all(np.diff(counts) <= 0)
    check_basic(ds, counts.sum(), 12, [str(c) for c in range(10)])
    assert ds.sources[0].startswith("sklearn-digits[")
    # Grey digits replicated on 3 channels, scaled to the full 0..255 range.
    assert np.array_equal(ds.images[..., 0], ds.images[..., 2]) and ds.images.max() >= 250


def test_digits_lt_seed_changes_selection_and_ratio_validated():
    a = load_dataset("digits_lt", image_size=8, seed=0)
    b = load_dataset("digits_lt", image_size=8, seed=0)
    c = load_dataset("digits_lt", image_size=8, seed=1)
    assert a.sources == b.sources and np.array_equal(a.images, b.images)
    assert a.sources != c.sources and np.array_equal(a.class_counts(), c.class_counts())
    flat = load_dataset("digits_lt", image_size=8, imbalance_ratio=1)
    assert len(set(flat.class_counts().tolist())) == 1
    with pytest.raises(DataError, match="imbalance_ratio"):
        load_dataset("digits_lt", image_size=8, imbalance_ratio=0.5)


# --- HAM10000 ----------------------------------------------------------------------------------

@pytest.mark.parametrize("maker", [make_ham10000_official, make_ham10000_copy])
def test_ham10000_layouts(tmp_path, maker):
    fx = maker(tmp_path, lesions_per_class=2, images_per_lesion=2)
    ds = load_dataset("ham10000", str(tmp_path), image_size=16)
    check_basic(ds, fx["n"], 16, HAM_CLASSES)
    assert ds.labels.tolist() == fx["labels"]
    assert ds.groups.tolist() == fx["lesions"]
    assert ds.official_split is None
    assert ds.class_counts().tolist() == fx["class_counts"].tolist()
    assert [str(p) for p in fx["paths"]] == ds.sources
    # Greyscale (official) and CMYK (copy) JPEGs arrive as RGB close to the source colour.
    rgb_row = 1 if maker is make_ham10000_official else 0
    assert np.abs(ds.images[rgb_row, 8, 8].astype(int) - class_color(ds.labels[rgb_row])).max() <= 6


def test_ham10000_unknown_dx_names_file_line_value(tmp_path):
    fx = make_ham10000_copy(tmp_path, lesions_per_class=1, images_per_lesion=1)
    lines = fx["csv"].read_text().splitlines()
    lines[2] = lines[2].replace(",bcc,", ",melanoma?,")  # data row 2 = line 3
    fx["csv"].write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as exc:
        load_dataset("ham10000", str(tmp_path), image_size=8)
    msg = str(exc.value)
    assert "labels.csv" in msg and "line 3" in msg and "melanoma?" in msg


def test_ham10000_missing_column_lists_found_columns(tmp_path):
    write_csv(tmp_path / "HAM10000_metadata.csv", ["lesion_id", "image_id", "diagnosis"],
              [["HAM_1", "ISIC_1", "nv"]])
    with pytest.raises(DataError) as exc:
        load_dataset("ham10000", str(tmp_path), image_size=8)
    msg = str(exc.value)
    assert "HAM10000_metadata.csv" in msg and "'dx'" in msg and "diagnosis" in msg


def test_ham10000_class_without_images(tmp_path):
    make_ham10000_official(tmp_path, classes=[c for c in HAM_CLASSES if c != "df"])
    with pytest.raises(DataError, match="df") as e:
        load_dataset("ham10000", str(tmp_path), image_size=8)
    assert str(tmp_path / "HAM10000_metadata.csv") in str(e.value)  # the file that lists no df image


def test_ham10000_no_metadata(tmp_path):
    with pytest.raises(DataError, match="HAM10000_metadata.csv"):
        load_dataset("ham10000", str(tmp_path), image_size=8)


def test_missing_image_error_and_skip(tmp_path):
    fx = make_ham10000_official(tmp_path, lesions_per_class=2, images_per_lesion=1)
    gone = fx["paths"][3]
    gone.unlink()
    with pytest.raises(DataError, match=gone.stem):
        load_dataset("ham10000", str(tmp_path), image_size=8)
    ds = load_dataset("ham10000", str(tmp_path), image_size=8, on_bad_image="skip")
    assert len(ds.labels) == fx["n"] - 1 and len(ds.skipped) == 1
    assert gone.stem in ds.skipped[0][0] and "not found" in ds.skipped[0][1]


def test_corrupt_image_error_and_skip(tmp_path):
    fx = make_ham10000_copy(tmp_path, lesions_per_class=2, images_per_lesion=1)
    bad = [fx["paths"][0], fx["paths"][5]]
    for p in bad:
        write_corrupt(p)
    with pytest.raises(DataError) as exc:
        load_dataset("ham10000", str(tmp_path), image_size=8)
    assert str(bad[0]) in str(exc.value) and "1 more" in str(exc.value)
    assert "data.on_bad_image=skip" in str(exc.value) and "BytesIO" not in str(exc.value)  # the key to set
    ds = load_dataset("ham10000", str(tmp_path), image_size=8, on_bad_image="skip")
    assert [s for s, _ in ds.skipped] == [str(p) for p in bad]
    assert len(ds.labels) == len(ds.sources) == len(ds.groups) == fx["n"] - 2
    assert str(bad[0]) not in ds.sources
    # Remaining rows keep their own labels/groups (mask applied consistently).
    assert ds.labels.tolist() == [lab for i, lab in enumerate(fx["labels"]) if i not in (0, 5)]


@pytest.mark.parametrize("name", ["digits_lt", "imagefolder"])
def test_bad_on_bad_image_option(tmp_path, name):
    make_imagefolder(tmp_path)
    with pytest.raises(DataError, match="on_bad_image"):
        load_dataset(name, str(tmp_path), image_size=8, on_bad_image="ignore")


def load_within(seconds: float, fifo, **kwargs) -> dict:
    """load_dataset(**kwargs) in a thread: {"ds": ...} or {"error": ...}. A load still running after
    `seconds` fails the test, once a writer has come and gone on `fifo` to release a reader blocked on it."""
    out = {}

    def run():
        try:
            out["ds"] = load_dataset(**kwargs)
        except Exception as e:  # noqa: BLE001 - handed to the test
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        try:  # a reader blocked in open() returns (and reads EOF) once a writer has opened and closed
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
        thread.join(10)
        pytest.fail(f"loading did not finish within {seconds}s: it blocked reading the FIFO {fifo}")
    return out


def csv_with_extra_row(tmp_path, rel_path: str) -> dict:
    fx = make_csv(tmp_path, with_group=False, with_split=False)
    with open(fx["csv"], "a") as fh:
        fh.write(f"{rel_path},2\n")
    return {"name": "csv", "csv": str(fx["csv"])}


def imagefolder_with(tmp_path, rel_path: str) -> dict:
    make_imagefolder(tmp_path)
    return {"name": "imagefolder", "root": str(tmp_path)}


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
@pytest.mark.parametrize("layout,where", [(csv_with_extra_row, "meta/imgs"), (imagefolder_with, "normal")])
def test_a_fifo_is_refused_not_read(tmp_path, layout, where):
    # Opening a FIFO for reading waits for a writer: forever, for a loader. Only regular files are read.
    options = layout(tmp_path, "imgs/pipe.png")
    fifo = tmp_path / where / "pipe.png"
    os.mkfifo(fifo)
    out = load_within(15, fifo, image_size=4, **options)
    assert isinstance(out.get("error"), DataError), out
    msg = str(out["error"])
    assert str(fifo) in msg and "not a regular file" in msg and "FIFO" in msg and "\n" not in msg
    out = load_within(15, fifo, image_size=4, on_bad_image="skip", **options)
    assert [s for s, _ in out["ds"].skipped] == [str(fifo)] and "not a regular file" in out["ds"].skipped[0][1]
    assert str(fifo) not in out["ds"].sources


def test_a_directory_listed_as_an_image_is_refused(tmp_path):
    options = csv_with_extra_row(tmp_path, "imgs/folder.png")
    (tmp_path / "meta" / "imgs" / "folder.png").mkdir()
    with pytest.raises(DataError, match=r"folder\.png: not a regular file \(a directory\)"):
        load_dataset(image_size=4, **options)


# --- APTOS -------------------------------------------------------------------------------------

@pytest.mark.parametrize("maker", [make_aptos_official, make_aptos_copy])
def test_aptos_layouts(tmp_path, maker):
    fx = maker(tmp_path)
    ds = load_dataset("aptos", str(tmp_path), image_size=10)
    check_basic(ds, fx["n"], 10, APTOS_CLASSES)
    assert ds.labels.tolist() == fx["labels"]
    assert ds.groups is None and ds.official_split is None


@pytest.mark.parametrize("value,why", [("x", "not an integer"), ("2.5", "not an integer"), ("5", "outside")])
def test_aptos_bad_diagnosis(tmp_path, value, why):
    fx = make_aptos_official(tmp_path)
    lines = fx["csv"].read_text().splitlines()
    lines[4] = lines[4].rsplit(",", 1)[0] + "," + value
    fx["csv"].write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as exc:
        load_dataset("aptos", str(tmp_path), image_size=8)
    assert "train.csv" in str(exc.value) and "line 5" in str(exc.value) and why in str(exc.value)


# --- DermaMNIST --------------------------------------------------------------------------------

@pytest.mark.parametrize("labels_csv", [True, False])
def test_dermamnist_official_split(tmp_path, labels_csv):
    fx = make_dermamnist(tmp_path, labels_csv=labels_csv)
    ds = load_dataset("dermamnist", str(tmp_path), image_size=28)
    check_basic(ds, fx["n"], 28, HAM_CLASSES)
    assert ds.class_counts().tolist() == fx["class_counts"].tolist()
    got = {s: int((ds.official_split == s).sum()) for s in ("train", "val", "test")}
    assert got == fx["split_counts"]
    # Each source path sits in the folder of its split and class.
    for src, lab, split in zip(ds.sources, ds.labels, ds.official_split):
        assert f"{split}/{HAM_CLASSES[lab]}/" in src.replace("\\", "/")


def test_dermamnist_bad_split_value(tmp_path):
    fx = make_dermamnist(tmp_path)
    text = fx["csv"].read_text().replace(",val\n", ",valid\n", 1)
    fx["csv"].write_text(text)
    with pytest.raises(DataError, match=r"labels.csv, line \d+.*'valid'"):
        load_dataset("dermamnist", str(tmp_path), image_size=8)


def test_dermamnist_from_medmnist_npz(tmp_path):
    # MedMNIST's own file: <split>_images (N, 28, 28, 3) uint8, <split>_labels (N, 1).
    counts = {"train": 14, "val": 7, "test": 7}
    arrays = {}
    for split, n in counts.items():
        labels = np.arange(n) % len(HAM_CLASSES)
        images = np.zeros((n, 28, 28, 3), np.uint8)
        images[..., 0] = labels[:, None, None] * 30  # class in the red channel
        arrays.update({f"{split}_images": images, f"{split}_labels": labels[:, None]})
    np.savez(tmp_path / "dermamnist.npz", **arrays)
    for root in (tmp_path, tmp_path / "dermamnist.npz"):  # the folder holding it, or the file itself
        ds = load_dataset("dermamnist", str(root), image_size=28)
        check_basic(ds, 28, 28, HAM_CLASSES)
        assert {s: int((ds.official_split == s).sum()) for s in counts} == counts
        np.testing.assert_array_equal(ds.images[:, 0, 0, 0], ds.labels * 30)  # image i keeps label i
    assert load_dataset("dermamnist", str(tmp_path), image_size=16).images.shape[1:] == (16, 16, 3)
    del arrays["val_labels"]
    (tmp_path / "broken").mkdir()
    np.savez(tmp_path / "broken" / "dermamnist.npz", **arrays)
    with pytest.raises(DataError, match=r"dermamnist\.npz: not a MedMNIST"):
        load_dataset("dermamnist", str(tmp_path / "broken"), image_size=8)


# --- imagefolder -------------------------------------------------------------------------------

def test_imagefolder_modes_formats_and_order(tmp_path):
    fx = make_imagefolder(tmp_path)
    ds = load_dataset("imagefolder", str(tmp_path), image_size=7)
    check_basic(ds, fx["n"], 7, fx["class_names"])
    assert ds.class_counts().tolist() == fx["class_counts"].tolist()
    assert not any(s.endswith(".txt") for s in ds.sources)
    by_name = dict(zip([s.replace("\\", "/").split(str(tmp_path).replace("\\", "/") + "/")[1]
                        for s in ds.sources], range(len(ds.sources))))
    # Lossless RGB/RGBA/palette/BMP files keep their class colour exactly: rows line up with labels.
    for name in ["benign/a.png", "benign/b.png", "malignant/a.png", "malignant/b.bmp", "normal/b.png"]:
        i = by_name[name]
        assert (ds.images[i] == class_color(ds.labels[i])).all(), name
    assert (ds.images[by_name["malignant/nested/c.png"]] == 255).all()  # 16-bit white -> 255
    grey = ds.images[by_name["benign/c.jpg"]]
    assert np.array_equal(grey[..., 0], grey[..., 1])


def test_imagefolder_threads_do_not_change_result(tmp_path):
    make_imagefolder(tmp_path)
    a = load_dataset("imagefolder", str(tmp_path), image_size=9, num_threads=1)
    b = load_dataset("imagefolder", str(tmp_path), image_size=9, num_threads=8)
    assert a.sources == b.sources and np.array_equal(a.images, b.images)


def test_imagefolder_empty_class_and_no_classes(tmp_path):
    make_imagefolder(tmp_path / "a")
    (tmp_path / "a" / "zz_empty").mkdir()
    (tmp_path / "a" / "zz_empty" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="zz_empty"):
        load_dataset("imagefolder", str(tmp_path / "a"), image_size=8)
    (tmp_path / "b").mkdir()
    with pytest.raises(DataError, match="no class subdirectories"):
        load_dataset("imagefolder", str(tmp_path / "b"), image_size=8)


# --- csv ---------------------------------------------------------------------------------------

def test_csv_loader_numeric_classes_groups_splits(tmp_path):
    fx = make_csv(tmp_path)
    for kwargs in ({"csv": str(fx["csv"])}, {"root": str(tmp_path / "meta")}):
        ds = load_dataset("csv", image_size=6, **kwargs)
        check_basic(ds, fx["n"], 6, ["0", "2", "10"])
        assert ds.labels.tolist() == fx["labels"]
        assert ds.groups.tolist() == fx["groups"]
        assert ds.official_split.tolist() == fx["splits"]
        for img, lab in zip(ds.images, ds.labels):
            assert (img == class_color(lab)).all()


def test_csv_optional_columns_absent(tmp_path):
    fx = make_csv(tmp_path, with_group=False, with_split=False)
    ds = load_dataset("csv", csv=str(fx["csv"]), image_size=6)
    assert ds.groups is None and ds.official_split is None and len(ds.labels) == fx["n"]


def test_csv_text_labels_sort_alphabetically(tmp_path):
    write_image(tmp_path / "x.png")
    write_image(tmp_path / "y.png")
    write_csv(tmp_path / "labels.csv", ["path", "label"], [["x.png", "tumour"], ["y.png", "healthy"]])
    ds = load_dataset("csv", str(tmp_path), image_size=4)
    assert ds.class_names == ["healthy", "tumour"] and ds.labels.tolist() == [1, 0]


@pytest.mark.parametrize("edit,match", [
    (lambda t: t.replace("path,label", "file,label", 1), r"missing column 'path'.*file"),
    (lambda t: t.replace("imgs/img2.png,2,", "imgs/img2.png, ,", 1), r"line 4.*empty label"),
    (lambda t: t.replace(",patient1,val", ",patient1,holdout", 1), r"line 5.*'holdout'"),
])
def test_csv_errors(tmp_path, edit, match):
    fx = make_csv(tmp_path)
    fx["csv"].write_text(edit(fx["csv"].read_text()))
    with pytest.raises(DataError, match=match) as exc:
        load_dataset("csv", csv=str(fx["csv"]), image_size=4)
    assert "labels.csv" in str(exc.value)


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
def test_csv_with_a_non_utf8_byte_names_file_line_and_byte(tmp_path, bom):
    fx = make_csv(tmp_path)
    lines = fx["csv"].read_bytes().splitlines(keepends=True)
    lines[3] = lines[3].replace(b"imgs/img", b"imgs/caf\xe9_img")  # Latin-1 e-acute on line 4
    fx["csv"].write_bytes(bom + b"".join(lines))
    with pytest.raises(DataError) as exc:
        load_dataset("csv", csv=str(fx["csv"]), image_size=4)
    msg = str(exc.value)
    assert str(fx["csv"]) in msg and "line 4" in msg and "0xe9" in msg and "UTF-8" in msg
    assert "\n" not in msg


def point_one_row_outside(tmp_path, csv_path, how: str) -> tuple[str, Path]:
    """Rewrite line 3 of `csv_path` to name an image outside the data folder `tmp_path / "data"`;
    returns the path cell written and the image's real location."""
    outside = write_image(tmp_path / "outside" / "x.png", (1, 2, 3))
    if how == "dotdot":
        cell = os.path.relpath(outside, csv_path.parent)
    elif how == "absolute":
        cell = str(outside)
    else:  # a link inside the folder that resolves outside it
        link = csv_path.parent / "link.png"
        link.symlink_to(outside)
        cell = "link.png"
    lines = csv_path.read_text().splitlines()
    lines[2] = ",".join([cell] + lines[2].split(",")[1:])
    csv_path.write_text("\n".join(lines) + "\n")
    return cell, outside


@pytest.mark.parametrize("name,maker,how", [
    ("csv", make_csv, "dotdot"), ("csv", make_csv, "absolute"), ("csv", make_csv, "symlink"),
    ("ham10000", make_ham10000_copy, "dotdot"), ("aptos", make_aptos_copy, "symlink"),
    ("dermamnist", make_dermamnist, "absolute"),
])
def test_csv_paths_outside_the_root_are_refused_unless_allowed(tmp_path, name, maker, how):
    fx = maker(tmp_path / "data")
    cell, outside = point_one_row_outside(tmp_path, fx["csv"], how)
    # csv without a root: the CSV's folder is the root; the others: their data.root.
    options = {"csv": str(fx["csv"])} if name == "csv" else {"root": str(tmp_path / "data")}
    with pytest.raises(DataError) as exc:
        load_dataset(name, image_size=4, **options)
    msg = str(exc.value)
    assert str(fx["csv"]) in msg and "line 3" in msg and repr(cell) in msg and "allow_outside_root" in msg
    ds = load_dataset(name, image_size=4, allow_outside_root=True, **options)
    assert os.path.realpath(ds.sources[1]) == str(outside.resolve())


def test_data_root_bounds_csv_paths_and_the_option_comes_from_the_config(tmp_path):
    from ioisray.config import load_config
    from ioisray.data.setup import setup_data

    fx = make_csv(tmp_path / "data")
    (tmp_path / "data" / "elsewhere").mkdir()
    # With a root, the root (not the CSV's folder) bounds the paths.
    with pytest.raises(DataError, match="outside"):
        load_dataset("csv", str(tmp_path / "data" / "elsewhere"), csv=str(fx["csv"]), image_size=4)
    point_one_row_outside(tmp_path, fx["csv"], "dotdot")
    config = ["data.name=csv", f"data.csv={fx['csv']}", "data.image_size=8"]
    with pytest.raises(DataError, match="outside"):
        setup_data(load_config(None, config))
    ds, _ = setup_data(load_config(None, config + ["data.allow_outside_root=true"]))
    assert len(ds.labels) == fx["n"]


# --- decoding ----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,suffix,expected", [
    ("RGB", ".png", (30, 60, 90)),
    ("L", ".png", None),  # grey: all channels equal
    ("1", ".png", None),  # dithered black/white, then resized: grey levels
    ("LA", ".png", None),
    ("RGBA", ".png", (30, 60, 90)),
    ("P", ".png", (30, 60, 90)),
    ("I;16", ".png", (255, 255, 255)),
    ("CMYK", ".jpg", "close"),
])
def test_decode_modes_to_rgb(tmp_path, mode, suffix, expected):
    path = write_image(tmp_path / f"img{suffix}", (30, 60, 90), mode)
    arr = decode_image(str(path), 5)
    assert arr.shape == (5, 5, 3) and arr.dtype == np.uint8
    if expected is None:
        assert np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2])
    elif expected == "close":
        assert np.abs(arr.astype(int) - (30, 60, 90)).max() <= 6
    else:
        assert (arr == expected).all()


def test_decode_transparent_pixels_become_black(tmp_path):
    img = Image.new("RGBA", (4, 4), (200, 100, 50, 0))
    img.putpixel((0, 0), (200, 100, 50, 255))
    img.save(tmp_path / "t.png")
    arr = decode_image(str(tmp_path / "t.png"), 4)
    assert tuple(arr[0, 0]) == (200, 100, 50) and (arr[3, 3] == 0).all()


def test_resize_stretches_to_square_bicubic(tmp_path):
    # Left half black, right half white on a 20x10 image: after the plain resize to 8x8 the
    # edge is still in the middle column (stretched, not cropped or padded).
    arr = np.zeros((10, 20), dtype=np.uint8)
    arr[:, 10:] = 255
    Image.fromarray(arr).save(tmp_path / "wide.png")
    out = decode_image(str(tmp_path / "wide.png"), 8)
    expected = np.asarray(Image.fromarray(arr).convert("RGB").resize((8, 8), Image.Resampling.BICUBIC))
    assert np.array_equal(out, expected)
    assert out[:, 0].max() == 0 and out[:, -1].min() == 255


def test_subset_and_class_counts(tmp_path):
    make_csv(tmp_path)
    ds = load_dataset("csv", str(tmp_path / "meta"), image_size=4)
    sub = ds.subset(np.array([0, 3, 5]))
    assert sub.labels.tolist() == ds.labels[[0, 3, 5]].tolist()
    assert sub.sources == [ds.sources[i] for i in (0, 3, 5)]
    assert sub.groups.tolist() == ds.groups[[0, 3, 5]].tolist()
    assert sub.class_counts().tolist() == np.bincount(sub.labels, minlength=3).tolist()
    assert ds.class_counts().dtype == np.int64


def test_image_size_validated(tmp_path):
    make_imagefolder(tmp_path)
    with pytest.raises(DataError, match="image_size"):
        load_dataset("imagefolder", str(tmp_path), image_size=0)


def test_a_csv_with_a_header_and_no_rows_is_named(tmp_path):
    (tmp_path / "labels.csv").write_text("path,label\n")
    with pytest.raises(DataError, match=f"{tmp_path / 'labels.csv'}: no images listed"):
        load_dataset("csv", str(tmp_path), image_size=8)
