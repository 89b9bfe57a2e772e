"""The benchmark scripts without data or Ray. benchmarks/ham10000_cpu.sh and dermamnist_iois.sh build each
run's command; an `ioisray` earlier on PATH that writes its arguments down stands in for training, so their
logic (names, overrides, skipping finished runs, unknown methods) runs as written. pair_by_path.py runs on
small made-up runs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _recording_ioisray(tmp_path) -> dict:
    """The environment of a script whose `ioisray` writes its arguments to tmp_path/calls, one per line,
    each call ended by ----."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    recorder = bin_dir / "ioisray"
    recorder.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" >> {tmp_path}/calls\necho ---- >> {tmp_path}/calls\n")
    recorder.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("EXTRA", None)
    return env


def _queue(tmp_path, *steps, extra=None):
    env = {**_recording_ioisray(tmp_path), "UNET": "/models/cfg/unet"}
    if extra is not None:
        env["EXTRA"] = extra
    done = subprocess.run(["bash", "benchmarks/ham10000_cpu.sh", "/data/ham", str(tmp_path / "out"), *steps],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    calls = (tmp_path / "calls").read_text().split("----\n")[:-1] if (tmp_path / "calls").exists() else []
    return done, [c.splitlines() for c in calls]


def test_overrides_follow_the_methods_own_and_finished_runs_are_skipped(tmp_path):
    finished = tmp_path / "out" / "ham10000_cpu_diffult_s0"
    finished.mkdir(parents=True)
    (finished / "metrics.json").write_text("{}")
    done, calls = _queue(tmp_path, "diffult:0,1",
                         extra="synthesis.filter=0.3 synthesis.filter_model=/runs/judge")
    assert done.returncode == 0, done.stderr
    assert len(calls) == 1  # seed 0 has its metrics.json
    args = calls[0]
    assert args[:2] == ["train", "configs/ham10000_cpu.yaml"]
    assert "name=ham10000_cpu_diffult_s1" in args and "seed=1" in args
    assert "diffusion.model_dir=/models/cfg/unet" in args
    # The method's overrides, then the queue's, so the queue's win where both set a key.
    assert args.index("synthesis.budget=balance") < args.index("synthesis.filter=0.3")
    assert args[-2:] == ["synthesis.filter=0.3", "synthesis.filter_model=/runs/judge"]


def test_without_overrides_a_run_gets_its_methods_only_and_an_unknown_method_is_named(tmp_path):
    done, calls = _queue(tmp_path, "logit_adjusted:2")
    assert done.returncode == 0, done.stderr
    assert calls[0][-3:] == ["name=ham10000_cpu_logit_adjusted_s2", "synthesis.mode=none",
                             "method.loss=logit_adjusted"]
    done, _ = _queue(tmp_path, "logit_adjustd:0")
    assert done.returncode != 0 and "no method 'logit_adjustd'" in done.stderr


def test_dermamnist_iois_names_a_method_it_does_not_have_before_any_run(tmp_path):
    env = {**_recording_ioisray(tmp_path), "METHODS": "ce ldam-drw", "SEEDS": "0"}
    done = subprocess.run(["bash", "benchmarks/dermamnist_iois.sh", "/data", "/unet", str(tmp_path / "out")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "no method 'ldam-drw'" in done.stderr
    assert not (tmp_path / "calls").exists()  # not even ce, which comes first


def _run(folder, split_id, paths, labels, predicted, in_split_order=True):
    """A finished run as pair_by_path reads it: metrics.json and test_predictions.csv (paths optional)."""
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"class_names": ["a", "b", "c"], "split_ids": {"test": split_id},
                                                     "test_predictions_in_split_order": in_split_order}))
    header = ("path," if paths else "") + "label,predicted\n"
    rows = [(f"{p}," if paths else "") + f"{y},{q}\n" for p, y, q in zip(paths or labels, labels, predicted)]
    (folder / "test_predictions.csv").write_text(header + "".join(rows))
    return str(folder)


def _pair(*args):
    done = subprocess.run([sys.executable, "benchmarks/pair_by_path.py", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    return done.returncode, done.stdout + done.stderr


def test_pair_by_path_matches_kept_runs_by_row_by_reference_or_not_at_all(tmp_path):
    rng = np.random.default_rng(0)
    paths = [f"{c}/img_{i}.jpg" for i, c in enumerate(rng.choice(list("abc"), 60))]
    labels = [p[0] for p in paths]
    guess_a, guess_b = ([p if rng.random() < q else rng.choice(list("abc")) for p in labels] for q in (0.8, 0.5))
    with_paths = [_run(tmp_path / f"full_{m}", "s1", paths, labels, g) for m, g in (("a", guess_a), ("b", guess_b))]
    kept = [_run(tmp_path / f"kept_{m}", "s1", None, labels, g) for m, g in (("a", guess_a), ("b", guess_b))]
    rc, by_path = _pair("--a", with_paths[0], "--b", with_paths[1])
    assert rc == 0 and "matched by path" in by_path and "balanced_accuracy: +" in by_path
    # Kept runs (no paths) of one split pair row by row, to the same numbers.
    rc, by_row = _pair("--a", kept[0], "--b", kept[1])
    assert rc == 0 and "matched row by row" in by_row
    deltas = [line.split("[")[0] for line in by_path.splitlines()[1:]]  # the intervals' resamples differ in order
    assert deltas == [line.split("[")[0] for line in by_row.splitlines()[1:]] and len(deltas) == 2
    # Against a run of another split (one image fewer), a kept run takes its paths from the reference of
    # its own split among several.
    other = _run(tmp_path / "other_split", "s2", paths[1:], labels[1:], guess_b[1:])
    rc, out = _pair("--a", kept[0], "--b", other, "--paths-from", other, with_paths[0])
    assert rc == 0 and "59 images" in out and "matched by path" in out
    rc, out = _pair("--a", kept[0], "--b", other, "--paths-from", other)
    assert rc != 0 and "kept_a: no --paths-from run lists its split" in out
    # Rows name images only in runs written in the split's order (as `ioisray benchmark` requires).
    unordered = _run(tmp_path / "unordered", "s1", None, labels, guess_b, in_split_order=False)
    for extra in ([], ["--paths-from", with_paths[0]]):
        rc, out = _pair("--a", kept[0], "--b", unordered, *extra)
        assert rc != 0 and "unordered: its test predictions were not written in the split's order" in out
