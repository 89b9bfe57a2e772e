"""Keep finished runs' results in the repository, without the data: copies each RUN/metrics.json to
DEST/<run>/metrics.json minus the machine's path to the run, and the run's test predictions as
DEST/<run>/test_predictions.csv with only the label and predicted class of each test image (in the test
split's order; no image, path or probability), so that after the runs themselves are gone
`benchmarks/summarize.py DEST/*/metrics.json` rebuilds a table and `ioisray benchmark ... --report-only`
with `output_dir=DEST` pairs kept runs image by image. `split_ids` are hashes of the splits' image lists
(they name no image); the report checks them to pair only runs tested on the same images.

    python benchmarks/keep_results.py benchmarks/results/ham10000_cpu outputs/ham10000_cpu_*_s?
"""
import csv
import io
import json
import sys
from pathlib import Path

from ioisray.atomic import atomic_write_text

DROPPED = ("run_dir",)
PREDICTIONS = "test_predictions.csv"  # ioisray.recipes.train.TEST_PREDICTIONS_FILE (importing it loads torch)
KEPT_COLUMNS = ("label", "predicted")


def main(dest: str, runs: list[str]) -> None:
    for run in map(Path, runs):
        source = run / "metrics.json"
        if not source.is_file():
            print(f"skipped {run}: no metrics.json (not finished)")
            continue
        results = {k: v for k, v in json.loads(source.read_text()).items() if k not in DROPPED}
        target = Path(dest) / run.name / "metrics.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        predictions = run / PREDICTIONS
        has_predictions = predictions.is_file()
        if has_predictions:
            with open(predictions, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
            out = io.StringIO()
            writer = csv.writer(out, lineterminator="\n")
            writer.writerow(KEPT_COLUMNS)
            writer.writerows([row[c] for c in KEPT_COLUMNS] for row in rows)
            atomic_write_text(target.parent / PREDICTIONS, out.getvalue())
        atomic_write_text(target, json.dumps(results, indent=1) + "\n")
        print(f"kept {target}" + (f" and its {PREDICTIONS}" if has_predictions else ""))


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
