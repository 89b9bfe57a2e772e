"""Paired differences between runs whose test splits hold the same images but not the same rows, matched
by image path: runs made before and after repeated rows were merged (2,003 against 2,002 test rows on
lesion-grouped HAM10000), which `ioisray benchmark` refuses to pair row by row. The protocol is the
benchmark's (ioisray.metrics.paired_bootstrap: the mean over seed pairs, 2,000 resamples of the images).

    python benchmarks/pair_by_path.py --a RUN_S0 RUN_S1 --b OTHER_S0 OTHER_S1 [--paths-from RUN ...]

Runs pair in the order given. A run whose test_predictions.csv has no `path` column (kept runs: see
benchmarks/keep_results.py) takes its paths from the first --paths-from run of the same split, one whose
labels agree with it row by row. When no run lists paths and all were tested on one split (the same
`split_ids.test`), they pair row by row, as `ioisray benchmark` would.
"""
import argparse
import csv
import json
from pathlib import Path

import numpy as np

from ioisray.metrics import PAIRED_KEYS, paired_bootstrap


def load(run: Path) -> tuple[list[dict[str, str]], dict]:
    """A finished run's test_predictions.csv rows and its metrics.json."""
    with open(run / "test_predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return rows, json.loads((run / "metrics.json").read_text())


def in_split_order(run: Path, metrics: dict) -> None:
    """Row order stands for the image only in runs that wrote their predictions in the split's order, as
    `ioisray benchmark` requires to pair them."""
    if not metrics.get("test_predictions_in_split_order"):
        raise SystemExit(f"{run}: its test predictions were not written in the split's order, so its rows "
                         f"name no image: it pairs only by a path column")


def predictions(run: Path, rows: list[dict[str, str]], metrics: dict, references: list, by_row: bool
                ) -> dict[str, tuple[str, str]]:
    """{image path, or row number when by_row: (label, predicted)}; an image listed twice keeps its first row.
    references: (run, rows, metrics) of each --paths-from run."""
    if by_row:
        in_split_order(run, metrics)
        for i, row in enumerate(rows):
            row["path"] = f"row {i}"
    elif rows and "path" not in rows[0]:
        if not references:
            raise SystemExit(f"{run}/test_predictions.csv has no path column: give --paths-from")
        in_split_order(run, metrics)
        labels = [r["label"] for r in rows]
        reference = next((ref for ref in references if [r["label"] for r in ref[1]] == labels), None)
        if reference is None:
            raise SystemExit(f"{run}: no --paths-from run lists its split in the same order "
                             f"({', '.join(str(ref[0]) for ref in references)})")
        in_split_order(reference[0], reference[2])
        for row, ref in zip(rows, reference[1]):
            row["path"] = ref["path"]
    out: dict[str, tuple[str, str]] = {}
    for row in rows:
        out.setdefault(row["path"], (row["label"], row["predicted"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", nargs="+", type=Path, required=True, help="method A's runs, one per seed")
    ap.add_argument("--b", nargs="+", type=Path, required=True, help="method B's runs, paired in order")
    ap.add_argument("--paths-from", nargs="+", type=Path, default=[],
                    help="runs (one per split) whose rows give paths to runs written without them")
    args = ap.parse_args()
    if len(args.a) != len(args.b):
        raise SystemExit(f"{len(args.a)} runs of A against {len(args.b)} of B: they pair one to one")
    loaded = {run: load(run) for run in args.a + args.b}
    references = [(run, *load(run)) for run in args.paths_from]
    test_splits = {metrics.get("split_ids", {}).get("test") for _, metrics in loaded.values()}
    by_row = (not any(rows and "path" in rows[0] for rows, _ in loaded.values())
              and len(test_splits) == 1 and None not in test_splits)
    runs_a = [predictions(run, *loaded[run], references, by_row) for run in args.a]
    runs_b = [predictions(run, *loaded[run], references, by_row) for run in args.b]
    common = sorted(set.intersection(*(set(r) for r in runs_a + runs_b)))
    names = loaded[args.a[0]][1]["class_names"]
    index = {n: i for i, n in enumerate(names)}
    y = np.array([index[runs_a[0][p][0]] for p in common])
    for run in runs_a + runs_b:
        if any(index[run[p][0]] != label for p, label in zip(common, y)):
            raise SystemExit("the runs give one image different labels: not the same data")
    pred = [np.array([index[run[p][1]] for p in common]) for run in runs_a + runs_b]
    diff = paired_bootstrap(y, pred[:len(runs_a)], pred[len(runs_a):], len(names))
    matched = "row by row (one split, no paths)" if by_row else "by path"
    print(f"{len(common)} images in every run's test split, matched {matched}, {len(runs_a)} seed pair(s)")
    for key in PAIRED_KEYS:
        d, low, high = diff[key]
        print(f"  {key}: {d:+.3f} [{low:+.3f}, {high:+.3f}]{' *' if low > 0 or high < 0 else ''}")


if __name__ == "__main__":
    main()
