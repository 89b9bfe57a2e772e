import math

import numpy as np
import pytest

from ioisray.metrics import classification_metrics, format_table, paired_bootstrap

NAMES = ["a", "b", "c"]


def one_hot_probs(pred, n=3):
    p = np.full((len(pred), n), 0.1)
    p[np.arange(len(pred)), pred] = 0.8
    return p


def test_against_a_known_confusion_matrix():
    # Confusion matrix (rows true, cols pred): a: [2, 1, 0], b: [0, 2, 0], c: [1, 0, 0]
    y = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 1, 1, 1, 0])
    m = classification_metrics(y, one_hot_probs(pred), NAMES)
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_class_accuracy"] == pytest.approx({"a": 2 / 3, "b": 1.0, "c": 0.0})
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    # precision a = 2/3, b = 2/3, c = 0 (never predicted); recall as above
    prec = [2 / 3, 2 / 3, 0.0]
    rec = [2 / 3, 1.0, 0.0]
    f1 = [2 * p * r / (p + r) if p + r else 0.0 for p, r in zip(prec, rec)]
    assert m["macro_precision"] == pytest.approx(np.mean(prec))
    assert m["macro_f1"] == pytest.approx(np.mean(f1))
    # Multi-class MCC (Gorodkin): (c*s - sum p_k t_k) / sqrt((s^2 - sum p_k^2)(s^2 - sum t_k^2))
    c, s = 4, 6
    t, p = np.array([3, 2, 1]), np.array([3, 3, 0])
    mcc = (c * s - (p * t).sum()) / math.sqrt((s**2 - (p**2).sum()) * (s**2 - (t**2).sum()))
    assert m["mcc"] == pytest.approx(mcc)
    assert m["support"] == {"a": 3, "b": 2, "c": 1} and m["num_samples"] == 6


def test_auc_one_vs_rest():
    y = np.array([0, 1, 2, 0])
    perfect = np.eye(3)[y] * 0.9 + 0.05
    assert classification_metrics(y, perfect, NAMES)["auc"] == pytest.approx(1.0)
    reversed_ = 1.0 - perfect
    assert classification_metrics(y, reversed_, NAMES)["auc"] == pytest.approx(0.0)


def test_class_absent_from_split_is_nan_not_zero():
    y = np.array([0, 0, 1, 1])  # class c absent, e.g. a tiny validation split
    m = classification_metrics(y, one_hot_probs(np.array([0, 0, 1, 0])), NAMES)
    assert math.isnan(m["per_class_accuracy"]["c"])
    assert m["balanced_accuracy"] == pytest.approx((1.0 + 0.5) / 2)
    assert not math.isnan(m["auc"])


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        classification_metrics([0, 1], np.zeros((2, 2)), NAMES)


def test_table_has_every_metric_and_class():
    y = np.array([0, 1, 2])
    m = classification_metrics(y, one_hot_probs(y), NAMES)
    table = format_table({"val": m, "test": m}, NAMES)
    for key in ("balanced_accuracy", "macro_f1", "mcc", "auc", "acc[a] (n=1)", "acc[c]"):
        assert key in table
    assert "| balanced_accuracy | 1.0000 | 1.0000 |" in table


def _noisy(y, right, rng, n_classes=7):
    """Predictions that are right on a share `right` of the images and random elsewhere."""
    return np.where(rng.random(len(y)) < right, y, rng.integers(0, n_classes, len(y)))


def test_paired_differences_are_the_mean_over_seeds_of_the_metric_differences():
    rng = np.random.default_rng(1)
    # Class 6 absent from the test split, class 5 two images: many resamples lack it (checked below).
    y = np.concatenate([np.full(300, 0), rng.integers(1, 5, 200), [5, 5]])
    a, b = [_noisy(y, 0.6, rng) for _ in range(3)], [_noisy(y, 0.5, rng) for _ in range(3)]
    names = list("abcdefg")

    def mean_diff(key):
        return np.mean([classification_metrics(y, np.eye(7)[p], names)[key]
                        - classification_metrics(y, np.eye(7)[q], names)[key] for p, q in zip(a, b)])

    diff = paired_bootstrap(y, a, b, num_classes=7, resamples=200)
    for key in ("balanced_accuracy", "macro_f1"):
        d, low, high = diff[key]
        assert d == pytest.approx(mean_diff(key), abs=1e-12)
        assert low < d < high
    # A resample without class 5 scores over the classes it has, as classification_metrics does.
    without_5 = np.flatnonzero(y != 5)
    one = paired_bootstrap(y[without_5], [p[without_5] for p in a[:1]], [p[without_5] for p in b[:1]], 7, resamples=1)
    ref = {k: classification_metrics(y[without_5], np.eye(7)[a[0][without_5]], names)[k]
           - classification_metrics(y[without_5], np.eye(7)[b[0][without_5]], names)[k] for k in one}
    assert {k: v[0] for k, v in one.items()} == pytest.approx(ref, abs=1e-12)


def test_a_paired_interval_separates_a_better_method_and_not_a_method_from_itself():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 7, 2000)
    better, worse = [_noisy(y, 0.7, rng) for _ in range(2)], [_noisy(y, 0.5, rng) for _ in range(2)]
    d, low, high = paired_bootstrap(y, better, worse, num_classes=7)["balanced_accuracy"]
    assert 0 < low < d < high
    assert paired_bootstrap(y, better, better, num_classes=7)["macro_f1"] == (0.0, 0.0, 0.0)
    # Fewer test images: the same kind of difference is less certain.
    _, low_small, high_small = paired_bootstrap(y[:200], [p[:200] for p in better], [p[:200] for p in worse],
                                                num_classes=7)["balanced_accuracy"]
    assert high_small - low_small > 2 * (high - low)
    with pytest.raises(ValueError, match="paired runs"):
        paired_bootstrap(y, better, worse[:1], num_classes=7)
