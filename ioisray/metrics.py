"""Classification metrics for imbalanced data, thin over scikit-learn.

`classification_metrics` takes labels and predicted class probabilities and returns the numbers the
IOIS paper reports (accuracy, balanced accuracy, macro precision / F1, MCC, one-vs-rest AUC) plus
per-class accuracy (recall) and the confusion matrix.
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import numpy as np

SUMMARY_KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "macro_precision", "mcc", "auc")


def _ovr_auc(y_true: np.ndarray, probs: np.ndarray, num_classes: int) -> float:
    """Macro one-vs-rest AUC over the classes present in y_true.

    sklearn's multi-class `roc_auc_score` refuses a split that lacks a class; a small validation split
    of a long-tailed set often does, so average the binary AUCs of the classes that can be scored.
    """
    from sklearn import metrics as skm

    aucs = []
    for c in range(num_classes):
        pos = y_true == c
        if pos.any() and (~pos).any():
            aucs.append(skm.roc_auc_score(pos, probs[:, c]))
    return float(np.mean(aucs)) if aucs else float("nan")


def _balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    # Mean recall over the classes present in y_true; sklearn warns when y_pred has other classes.
    from sklearn import metrics as skm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(skm.balanced_accuracy_score(y_true, y_pred))


def classification_metrics(y_true: Sequence[int], probs: np.ndarray, class_names: Sequence[str]) -> dict:
    """Metrics of predictions `probs` (N, C) against integer labels `y_true` (N,)."""
    # Imported here: scikit-learn takes 1-3 s to import, and most processes that import this module (Ray
    # Train workers other than rank 0, synthesis actors) never compute a metric.
    from sklearn import metrics as skm

    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    num_classes = len(class_names)
    if probs.ndim != 2 or probs.shape != (len(y_true), num_classes):
        raise ValueError(f"probs must have shape ({len(y_true)}, {num_classes}), got {probs.shape}")
    y_pred = probs.argmax(axis=1)
    labels = np.arange(num_classes)
    cm = skm.confusion_matrix(y_true, y_pred, labels=labels)
    # Per-class accuracy is the recall of each class; NaN for a class absent from y_true.
    support = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan)
    present = support > 0
    return {
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "balanced_accuracy": _balanced_accuracy(y_true, y_pred),
        "macro_f1": float(skm.f1_score(y_true, y_pred, labels=labels[present], average="macro",
                                       zero_division=0)),
        "macro_precision": float(skm.precision_score(y_true, y_pred, labels=labels[present],
                                                     average="macro", zero_division=0)),
        "mcc": float(skm.matthews_corrcoef(y_true, y_pred)),
        "auc": _ovr_auc(y_true, probs, num_classes),
        "per_class_accuracy": {name: float(per_class[i]) for i, name in enumerate(class_names)},
        "support": {name: int(support[i]) for i, name in enumerate(class_names)},
        "confusion_matrix": cm.tolist(),
        "num_samples": int(len(y_true)),
    }


def format_table(results: dict[str, dict], class_names: Sequence[str]) -> str:
    """A Markdown table: one column per split (e.g. best validation and test), one row per metric."""
    splits = list(results)
    rows = ["| metric | " + " | ".join(splits) + " |", "|---|" + "---|" * len(splits)]
    for key in SUMMARY_KEYS:
        rows.append(f"| {key} | " + " | ".join(f"{results[s][key]:.4f}" for s in splits) + " |")
    for name in class_names:
        rows.append(f"| acc[{name}] (n={results[splits[-1]]['support'][name]}) | "
                    + " | ".join(f"{results[s]['per_class_accuracy'][name]:.4f}" for s in splits) + " |")
    return "\n".join(rows)


def predictions_csv(paths: Sequence[str], probs: np.ndarray, class_names: Sequence[str],
                    labels: Optional[Sequence[int]] = None) -> str:
    """One row per image, in the given order: its path, [its label,] the predicted class and the
    probability of every class (quoted as CSV needs: class names come from folder names and label
    files). A run's test predictions and `ioisray evaluate`'s are this same file."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", *(["label"] if labels is not None else []), "predicted",
                     *(f"prob_{n}" for n in class_names)])
    for i, (path, p) in enumerate(zip(paths, probs)):
        writer.writerow([path, *([class_names[int(labels[i])]] if labels is not None else []),
                         class_names[int(p.argmax())], *(f"{v:.6f}" for v in p)])
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Is a difference between two methods more than the test set's luck? (`ioisray benchmark`)

PAIRED_KEYS = ("balanced_accuracy", "macro_f1")


def _bacc_and_macro_f1(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Balanced accuracy and macro-F1 of confusion matrices (..., C, C) (rows: true class), over the
    classes present, as classification_metrics computes them; vectorised for the bootstrap below."""
    tp = np.diagonal(cm, axis1=-2, axis2=-1).astype(float)
    support, predicted = cm.sum(axis=-1), cm.sum(axis=-2)
    present = support > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(present, tp / np.maximum(support, 1), 0.0)
        denominator = support + predicted  # 2 tp + fp + fn
        f1 = np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)
    n = present.sum(axis=-1)
    return (recall * present).sum(axis=-1) / n, (f1 * present).sum(axis=-1) / n


def paired_bootstrap(y_true: np.ndarray, pred_a: Sequence[np.ndarray], pred_b: Sequence[np.ndarray],
                     num_classes: int, resamples: int = 2000, seed: int = 0) -> dict[str, tuple[float, float, float]]:
    """Method A against method B on the same test images: the mean over paired runs (seeds) of A's minus
    B's balanced accuracy and macro-F1, and a 95% percentile interval of that mean over bootstrap
    resamples of the test images, each resample the same images for every run. It says how much of a
    difference the test set's sampling alone could make; seed-to-seed spread is the table's ± std.
    Returns {metric: (difference, low, high)}."""
    y_true = np.asarray(y_true, dtype=np.int64)
    if len(pred_a) != len(pred_b) or not pred_a:
        raise ValueError(f"paired runs needed: {len(pred_a)} of A, {len(pred_b)} of B")
    runs = np.stack([np.asarray(p, dtype=np.int64) for p in (*pred_a, *pred_b)])  # (2R, N)
    if runs.shape[1] != len(y_true):
        raise ValueError(f"predictions of {runs.shape[1]} images for {len(y_true)} labels")
    cells = y_true * num_classes + runs  # (2R, N): each image's confusion-matrix cell in each run
    half, c2 = len(pred_a), num_classes * num_classes

    def differences(rows: np.ndarray) -> np.ndarray:  # rows: (B, N) image indices -> (B, metrics)
        b = len(rows)
        picked = cells[:, rows]  # (2R, B, N)
        offsets = (np.arange(len(cells))[:, None] * b + np.arange(b)[None, :]) * c2
        cm = np.bincount((picked + offsets[..., None]).ravel(), minlength=len(cells) * b * c2)
        scores = np.stack(_bacc_and_macro_f1(cm.reshape(len(cells), b, num_classes, num_classes)), -1)
        return (scores[:half] - scores[half:]).mean(axis=0)  # (B, metrics)

    point = differences(np.arange(len(y_true))[None, :])[0]
    rng, boot = np.random.default_rng(seed), []
    for start in range(0, resamples, 250):  # in slices: (2R, 250, N) cells at a time
        boot.append(differences(rng.integers(0, len(y_true), (min(250, resamples - start), len(y_true)))))
    low, high = np.percentile(np.concatenate(boot), [2.5, 97.5], axis=0)
    return {k: (float(point[i]), float(low[i]), float(high[i])) for i, k in enumerate(PAIRED_KEYS)}
