"""Paired differences between runs whose test splits hold the same images but not the same rows, matched
by image path: runs made before and after repeated rows were merged (2,003 against 2,002 test rows on
lesion-grouped HAM10000), which `ioisray benchmark` refuses to pair row by row. The protocol is the
benchmark's (ioisray.metrics.paired_bootstrap: the mean over seed pairs, 2,000 resamples of the images).

    python benchmarks/pair_by_path.py --a RUN_S0 RUN_S1 --b OTHER_S0 OTHER_S1 [--paths-from RUN]

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


def rows_of(run: Path) -> list[dict[str, str]]:
    with open(run / "test_predictions.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_split_id(run: Path) -> str | None:
    return json.loads((run / "metrics.json").read_text()).get("split_ids", {}).get("test")


def predictions(run: Path, paths_from: list[Path], by_row: bool) -> dict[str, tuple[str, str]]:
    """{image path, or row number when by_row: (label, predicted)}; an image listed twice keeps its first row."""
    rows = rows_of(run)
    if by_row:
        for i, row in enumerate(rows):
            row["path"] = f"row {i}"
    elif rows and "path" not in rows[0]:
        if not paths_from:
            raise SystemExit(f"{run}/test_predictions.csv has no path column: give --paths-from")
        labels = [r["label"] for r in rows]
        reference = next((ref for ref in map(rows_of, paths_from) if [r["label"] for r in ref] == labels), None)
        if reference is None:
            raise SystemExit(f"{run}: no --paths-from run lists its split in the same order "
                             f"({', '.join(map(str, paths_from))})")
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
    ap.add_argument("--paths-from", nargs="+", type=Path, default=[],
                    help="runs (one per split) whose rows give paths to runs written without them")
    args = ap.parse_args()
    if len(args.a) != len(args.b):
        raise SystemExit(f"{len(args.a)} runs of A against {len(args.b)} of B: they pair one to one")
    everyone = args.a + args.b
    by_row = (not any("path" in (rows_of(r)[:1] or [{}])[0] for r in everyone)
              and len({test_split_id(r) for r in everyone}) == 1 and test_split_id(everyone[0]) is not None)
    runs_a = [predictions(r, args.paths_from, by_row) for r in args.a]
    runs_b = [predictions(r, args.paths_from, by_row) for r in args.b]
    common = sorted(set.intersection(*(set(r) for r in runs_a + runs_b)))
    names = json.loads((args.a[0] / "metrics.json").read_text())["class_names"]
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
