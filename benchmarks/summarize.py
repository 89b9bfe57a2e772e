"""Summarise finished runs: `python benchmarks/summarize.py outputs/*/metrics.json`.

Prints one Markdown row per run (test balanced accuracy, macro-F1, per-class accuracy, seconds per
epoch, and for synthesis runs the mean seconds an epoch's synthetic images took to generate) and, grouping runs whose names differ only in a trailing _s<seed>, the mean ± std over seeds of
every test metric (the table `ioisray benchmark` writes). For synthesis runs it then prints what AAS
gave each class: synthetic images received per epoch, on average over the epochs, as a multiple of the
class's real training images (the paper's setting gives tail classes several times their real count).
"""
import json
import math
import re
import sys
from pathlib import Path

from ioisray.experiments import aggregate, results_markdown


def _generation(results: dict) -> float:
    """Mean over epochs of the seconds the pool took to make an epoch's synthetic images (NaN: none)."""
    seconds = [h["generation_seconds"] for h in results.get("history", []) if h.get("generation_seconds") is not None]
    return sum(seconds) / len(seconds) if seconds else math.nan


def _synthetic_per_epoch(results: dict):
    """Per class, the mean over epochs of the synthetic images the workers received (None: no synthesis)."""
    per_epoch = [h["synthetic_per_class"] for h in results.get("history", []) if h.get("synthetic_per_class")]
    if not per_epoch or not any(map(sum, per_epoch)):
        return None
    return [sum(col) / len(per_epoch) for col in zip(*per_epoch)]


def main(paths: list[str]) -> None:
    runs = {Path(p).parent.name: json.loads(Path(p).read_text()) for p in paths}
    if not runs:
        sys.exit("no metrics.json given")
    names = next(iter(runs.values()))["class_names"]
    print("| run | test BACC | test macro-F1 | " + " | ".join(names) + " | best epoch | s/epoch | generation s/epoch |")
    print("|---|---|---|" + "---|" * len(names) + "---|---|---|")
    for run, r in sorted(runs.items()):
        t = r["test"]
        pc = " | ".join(f"{t['per_class_accuracy'][n]:.3f}" for n in names)
        print(f"| {run} | {t['balanced_accuracy']:.4f} | {t['macro_f1']:.4f} | {pc} | "
              f"{r['best_epoch'] + 1} | {r.get('mean_epoch_seconds', math.nan):.1f} | {_generation(r):.1f} |")
    print()
    print(results_markdown(aggregate(runs, {run: re.sub(r"_s\d+$", "", run) for run in sorted(runs)})), end="")
    synthetic = {run: _synthetic_per_epoch(r) for run, r in sorted(runs.items())}
    synthetic = {run: made for run, made in synthetic.items() if made is not None}
    if synthetic:
        print("\nSynthetic images received per epoch (mean over epochs) / real training images, per class:\n")
        print("| run | " + " | ".join(names) + " | total per epoch |")
        print("|---|" + "---|" * len(names) + "---|")
        for run, made in synthetic.items():
            real = runs[run].get("train_class_counts") or [math.nan] * len(names)
            cells = " | ".join(f"{m:.0f} / {n} = {m / n:.2f}x" for m, n in zip(made, real))
            print(f"| {run} | {cells} | {sum(made):.0f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
