"""benchmarks/ham10000_cpu.sh builds each run's command from configs/ham10000_cpu_benchmark.yaml; an
`ioisray` earlier on PATH that writes its arguments down stands in for training, so the queue's logic
(names, overrides, skipping finished runs) runs as written without data or Ray."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _queue(tmp_path, *steps, extra=None):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    recorder = bin_dir / "ioisray"
    recorder.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" >> {tmp_path}/calls\necho ---- >> {tmp_path}/calls\n")
    recorder.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "UNET": "/models/cfg/unet"}
    env.pop("EXTRA", None)
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
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ioisray").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/calls\n")
    (bin_dir / "ioisray").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "METHODS": "ce ldam-drw", "SEEDS": "0"}
    done = subprocess.run(["bash", "benchmarks/dermamnist_iois.sh", "/data", "/unet", str(tmp_path / "out")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "no method 'ldam-drw'" in done.stderr
    assert not (tmp_path / "calls").exists()  # not even ce, which comes first
