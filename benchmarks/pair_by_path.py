"""Paired differences between runs whose test splits hold the same images but not the same rows, matched
by image path: runs made before and after repeated rows were merged (2,003 against 2,002 test rows on
lesion-grouped HAM10000), which `ioisray benchmark` refuses to pair row by row. The protocol is the
benchmark's (ioisray.metrics.paired_bootstrap: the mean over seed pairs, 2,000 resamples of the images).

    python benchmarks/pair_by_path.py --a RUN_S0 RUN_S1 --b OTHER_S0 OTHER_S1 [--paths-from RUN]

Runs pair in the order given. A run whose test_predictions.csv has no `path` column (written before it
had one) takes its paths from --paths-from, a run of the same split whose rows are in the same order;
its labels must agree row by row.
"""
import argparse
import csv
import json
from pathlib import Path

import numpy as np

from ioisray.metrics import PAIRED_KEYS, paired_bootstrap


def predictions(run: Path, paths_from: Path | None) -> dict[str, tuple[str, str]]:
    """{image path: (label, predicted)}; an image listed twice keeps its first row."""
    with open(run / "test_predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and "path" not in rows[0]:
        if paths_from is None:
            raise SystemExit(f"{run}/test_predictions.csv has no path column: give --paths-from")
        with open(paths_from / "test_predictions.csv", newline="") as f:
            reference = list(csv.DictReader(f))
        if [r["label"] for r in reference] != [r["label"] for r in rows]:
            raise SystemExit(f"{run} and --paths-from {paths_from} do not list the same split in the same order")
        for row, ref in zip(rows, reference):
            row["path"] = ref["path"]
    out: dict[str, tuple[str, str]] = {}
    for row in rows:
        out.setdefault(row["path"], (row["label"], row["predicted"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", nargs="+", type=Path, required=True, help="method A's runs, one per seed")
    ap.add_argument("--b", nargs="+", type=Path, required=True, help="method B's runs, paired in order")
    ap.add_argument("--paths-from", type=Path, help="a run whose rows give paths to runs written without them")
    args = ap.parse_args()
    if len(args.a) != len(args.b):
        raise SystemExit(f"{len(args.a)} runs of A against {len(args.b)} of B: they pair one to one")
    runs_a = [predictions(r, args.paths_from) for r in args.a]
    runs_b = [predictions(r, args.paths_from) for r in args.b]
    common = sorted(set.intersection(*(set(r) for r in runs_a + runs_b)))
    names = json.loads((args.a[0] / "metrics.json").read_text())["class_names"]
    index = {n: i for i, n in enumerate(names)}
    y = np.array([index[runs_a[0][p][0]] for p in common])
    for run in runs_a + runs_b:
        if any(index[run[p][0]] != label for p, label in zip(common, y)):
            raise SystemExit("the runs give one image different labels: not the same data")
    pred = [np.array([index[run[p][1]] for p in common]) for run in runs_a + runs_b]
    diff = paired_bootstrap(y, pred[:len(runs_a)], pred[len(runs_a):], len(names))
    print(f"{len(common)} images in every run's test split, {len(runs_a)} seed pair(s)")
    for key in PAIRED_KEYS:
        d, low, high = diff[key]
        print(f"  {key}: {d:+.3f} [{low:+.3f}, {high:+.3f}]{' *' if low > 0 or high < 0 else ''}")


if __name__ == "__main__":
    main()
