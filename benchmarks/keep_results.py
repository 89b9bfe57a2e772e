"""Keep finished runs' results in the repository, without the data: copies each RUN/metrics.json to
DEST/<run>/metrics.json minus the image ids of the splits (`split_ids`, taken from the dataset) and the
machine's path to the run, so `benchmarks/summarize.py DEST/*/metrics.json` can rebuild a table after the
runs themselves are gone. Predictions stay with the runs (they list the dataset's images).

    python benchmarks/keep_results.py benchmarks/results/ham10000_cpu outputs/ham10000_cpu_*_s?
"""
import json
import sys
from pathlib import Path

from ioisray.atomic import atomic_write_text

DROPPED = ("split_ids", "run_dir")


def main(dest: str, runs: list[str]) -> None:
    for run in map(Path, runs):
        source = run / "metrics.json"
        if not source.is_file():
            print(f"skipped {run}: no metrics.json (not finished)")
            continue
        results = {k: v for k, v in json.loads(source.read_text()).items() if k not in DROPPED}
        target = Path(dest) / run.name / "metrics.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(target, json.dumps(results, indent=1) + "\n")
        print(f"kept {target}")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
