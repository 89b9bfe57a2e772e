"""How `ioisray train` ends when SIGTERM reaches every process of the job (systemd, Slurm), its private
Ray's included: a tiny IOIS run on the embedded digits (2 Ray Train workers, 1 synthesis actor) is
stopped after its first epoch, `--tries` times; each try prints its exit code, how long the stop took,
whether the command said where the run stopped, and what it left (the run's lock, pymp-* folders).

    ioisray pretrain-diffusion configs/pretrain_digits.yaml diffusion.image_size=16 pretrain.epochs=2 \\
        pretrain.max_batches_per_epoch=2 output_dir=/tmp/stops
    python benchmarks/sigterm_stops.py /tmp/stops/digits_diffusion/unet /tmp/stops/tries --tries 10

Two of these at once load a 2-core machine as the test suite does.
"""
import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ioisray.checkpoint import CheckpointStore

ROOT = Path(__file__).resolve().parents[1]
TINY_IOIS = ["model.name=resnet10t", "data.image_size=16", "train.batch_size=16", "ray.num_workers=2", "train.epochs=3",
             "synthesis.mode=online", "synthesis.budget=48", "synthesis.chunk_size=4", "synthesis.pool_size=1",
             "synthesis.num_cpus=0.5", "sampler.steps=8", "baseline=null", "name=iois"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="a diffusion model folder for the digits (16 px)")
    parser.add_argument("out", type=Path, help="a folder for the tries' runs and logs")
    parser.add_argument("--tries", type=int, default=10)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_AUTH_MODE": "disabled"}
    ok = 0
    for i in range(args.tries):
        store, tmp = args.out / f"store{i}", tempfile.mkdtemp(prefix="t", dir="/tmp")  # short: Ray's socket paths
        log = args.out / f"try{i}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "ioisray", "train", "configs/digits.yaml", *TINY_IOIS,
                                     f"diffusion.model_dir={args.model_dir}", f"output_dir={store}"], cwd=ROOT,
                                    env={**env, "TMPDIR": tmp}, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            while CheckpointStore(store / "iois" / "checkpoints").latest_epoch() < 1 and proc.poll() is None:
                time.sleep(0.2)
            t0 = time.monotonic()
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        said = "stopped by SIGTERM: run iois interrupted at epoch 2 of 3" in log.read_text()
        lock = (store / "iois" / ".lock").exists()
        left = sorted(p.name for p in Path(tmp).glob("pymp-*"))
        good = proc.returncode == 143 and said and not lock and not left
        ok += good
        print(f"try {i}: exit {proc.returncode} after {time.monotonic() - t0:.1f} s, said where it stopped: {said}, "
              f"lock left: {lock}, pymp folders left: {left or 'none'}", flush=True)
    print(f"{ok} of {args.tries} stops exited 143, said where the run stopped and left nothing")


if __name__ == "__main__":
    main()
