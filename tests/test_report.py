"""The end-of-run figures: per-class accuracy change against a baseline, real vs synthetic images."""
import json

import numpy as np
import pytest
from PIL import Image

from ioisray import report


def write_run(path, names, per_class, bacc):
    path.mkdir()
    (path / "metrics.json").write_text(json.dumps({"class_names": names, "test": {
        "per_class_accuracy": dict(zip(names, per_class)), "balanced_accuracy": bacc}}))
    return path


def test_per_class_change_figure_is_written_and_checks_the_classes(tmp_path):
    run = write_run(tmp_path / "iois", ["a", "b", "c"], [0.9, 0.5, 0.4], 0.6)
    base = write_run(tmp_path / "ce", ["a", "b", "c"], [0.95, 0.3, 0.1], 0.45)
    png = report.per_class_change_from_runs(run, base)
    assert png == run / report.PER_CLASS_CHANGE_PNG and Image.open(png).size[0] > 100
    other = write_run(tmp_path / "other", ["a", "b", "x"], [0.9, 0.5, 0.4], 0.6)
    with pytest.raises(ValueError, match="differ"):
        report.per_class_change_from_runs(run, other)


def test_real_vs_synthetic_grid_handles_classes_without_synthetic_images(tmp_path):
    rng = np.random.default_rng(0)
    real = [rng.integers(0, 255, (3, 8, 8, 3), dtype=np.uint8) for _ in range(2)]
    synthetic = [rng.integers(0, 255, (2, 8, 8, 3), dtype=np.uint8), np.zeros((0,), np.uint8)]
    png = report.real_vs_synthetic(["a", "b"], real, synthetic, tmp_path / "grid.png")
    assert Image.open(png).size[0] > 100 and not list(tmp_path.glob(".*"))  # no temp file left
    # The tiles: class b's row holds its 3 real images and no synthetic one (white).
    mosaic = report._mosaic(real, 3, (8, 8))
    assert np.array_equal(mosaic[2 + 10:2 + 18, 2 + 20:2 + 28], real[1][2])
    assert (report._mosaic(synthetic, 3, (8, 8))[12:20] == 255).all()


def test_confusion_matrix_figure_takes_a_class_without_images(tmp_path):
    png = report.confusion_matrix(["a", "b", "c"], [[3, 1, 0], [0, 0, 0], [2, 0, 5]],
                                  tmp_path / "eval" / report.CONFUSION_MATRIX_PNG, "test")
    assert png.is_file() and Image.open(png).size[0] > 100
    assert [p.name for p in png.parent.iterdir()] == [report.CONFUSION_MATRIX_PNG]  # no temporary left
