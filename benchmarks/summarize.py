"""Summarise finished runs: `python benchmarks/summarize.py outputs/*/metrics.json`.

Prints one Markdown row per run (test balanced accuracy, macro-F1, per-class accuracy, seconds per
epoch) and, where a run name ends in _s<seed>, the mean and std over seeds of each method.
"""
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np


def main(paths: list[str]) -> None:
    runs = {}
    for p in paths:
        r = json.loads(Path(p).read_text())
        runs[Path(p).parent.name] = r
    if not runs:
        sys.exit("no metrics.json given")
    names = next(iter(runs.values()))["class_names"]
    print("| run | test BACC | test macro-F1 | " + " | ".join(names) + " | best epoch | s/epoch |")
    print("|---|---|---|" + "---|" * len(names) + "---|---|")
    groups = defaultdict(list)
    for run, r in sorted(runs.items()):
        t = r["test"]
        pc = " | ".join(f"{t['per_class_accuracy'][n]:.3f}" for n in names)
        print(f"| {run} | {t['balanced_accuracy']:.4f} | {t['macro_f1']:.4f} | {pc} | "
              f"{r['best_epoch'] + 1} | {r.get('mean_epoch_seconds', float('nan')):.1f} |")
        groups[re.sub(r"_s\d+$", "", run)].append(r)
    if any(len(v) > 1 for v in groups.values()):
        print("\n| method | seeds | test BACC | test macro-F1 |\n|---|---|---|---|")
        for g, rs in sorted(groups.items()):
            b = [r["test"]["balanced_accuracy"] for r in rs]
            f = [r["test"]["macro_f1"] for r in rs]
            print(f"| {g} | {len(rs)} | {np.mean(b):.4f} ± {np.std(b):.4f} | {np.mean(f):.4f} ± {np.std(f):.4f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
