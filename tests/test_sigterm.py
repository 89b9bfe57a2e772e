"""SIGTERM stops an `ioisray` command as Ctrl-C does (ioisray/sigterm.py). The stops of real runs are in
test_job.py (`train`: IOIS on 2 Ray Train workers, SIGTERM to every process of the job after its first
epoch, then resumed) and test_tune_cli.py (`tune`: a search stopped and resumed); here, the handler
itself, the entry every command shares, and `pretrain-diffusion` and `benchmark` stopped."""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from cli_utils import ENV, ROOT, ctrl_c_as_usual, interrupt_after, latest_epoch

from ioisray import sigterm


def _deliver(sig: int) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(0.05)  # Python runs the handler at its next instruction in the main thread


def test_sigterm_goes_to_the_ctrl_c_handler_once():
    # Ray Tune's Ctrl-C handler stops and saves the search: SIGTERM reaches it; a second SIGTERM, while
    # the stop is under way, is ignored.
    calls = []
    before_int = signal.signal(signal.SIGINT, lambda signum, frame: calls.append(signum))
    before = sigterm.install()
    try:
        assert not sigterm.received()
        _deliver(signal.SIGTERM)
        assert calls == [signal.SIGINT] and sigterm.received()
        _deliver(signal.SIGTERM)
        assert calls == [signal.SIGINT]
    finally:
        sigterm.uninstall(before)
        signal.signal(signal.SIGINT, before_int)
    assert signal.getsignal(signal.SIGTERM) == before and not sigterm.installed()


@pytest.mark.parametrize("on_ctrl_c", [signal.default_int_handler, signal.SIG_IGN])
def test_sigterm_raises_keyboard_interrupt_even_where_ctrl_c_is_ignored(on_ctrl_c):
    before_int = signal.signal(signal.SIGINT, on_ctrl_c)
    before = sigterm.install()
    try:
        with pytest.raises(KeyboardInterrupt):
            _deliver(signal.SIGTERM)
        sigterm.reinstall()  # as after ray.init: still ours, the stop still marked
        assert signal.getsignal(signal.SIGTERM) is sigterm._on_sigterm and sigterm.received()
    finally:
        sigterm.uninstall(before)
        signal.signal(signal.SIGINT, before_int)


@pytest.mark.ray
def test_sigterm_while_pretraining_starts_stops_it_as_ctrl_c_would(tmp_path):
    # The real command, stopped once its data is loaded: in its run's set-up or while its Ray starts
    # (ray.init sets a handler of its own), wherever it lands it stops with the interrupted line and
    # 128 + SIGTERM, its lock released, without Ray's stack dump.
    log = tmp_path / "pretrain.log"
    args = ["pretrain-diffusion", "configs/pretrain_digits.yaml", "diffusion.image_size=16", "pretrain.epochs=1",
            "pretrain.max_batches_per_epoch=1", "pretrain.sample_every=0", "ray.num_workers=0",
            f"output_dir={tmp_path}", "name=pre"]
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ioisray", *args], cwd=ROOT, env=ENV, stdout=out,
                                stderr=subprocess.STDOUT, preexec_fn=ctrl_c_as_usual)
        try:
            deadline = time.time() + 120
            while "[ioisray] data " not in log.read_text() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.05)
            assert proc.poll() is None, log.read_text()[-3000:]
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    printed = log.read_text()
    assert proc.returncode == 143, printed[-3000:]
    assert "ioisray: stopped by SIGTERM: " in printed and "interrupted" in printed, printed[-3000:]
    assert "rerun the same command to resume" in printed
    assert "Traceback" not in printed and "SIGTERM received" not in printed, printed[-3000:]
    assert not (tmp_path / "pre" / ".lock").exists()


@pytest.mark.ray
def test_sigterm_stops_a_benchmark_during_its_first_run_as_ctrl_c_would(tmp_path):
    # `benchmark` runs its grid's unfinished runs as Ray Tune trials, as `tune` runs a search
    # (test_tune_cli.py stops and resumes one): stopped during its first run, it says so in one line.
    args = ["benchmark", str(ROOT / "configs/digits_ce.yaml"), "model.name=resnet10t", "data.image_size=16",
            "train.batch_size=16", "ray.num_workers=0", "train.epochs=3", "name=bench",
            "benchmark.methods={ce: []}", "benchmark.seeds=[0, 1]", "benchmark.max_concurrent_trials=1"]
    outputs = tmp_path / "outputs"
    first = outputs / "bench_ce_s0"  # finished runs keep no checkpoints: its metrics say it finished

    def epochs_of_the_first_run():
        return latest_epoch(first) or (3 if (first / "metrics.json").exists() else 0)

    done, printed, code = interrupt_after(args, first, epochs=1, timeout=300, cwd=tmp_path, sig=signal.SIGTERM,
                                          progress=epochs_of_the_first_run)
    assert done >= 1 and code == 143, printed[-3000:]  # 128 + SIGTERM
    # Stopped before the grid's second run finished, and before the table (it needs every run).
    assert not (outputs / "bench_ce_s1" / "metrics.json").exists() and not (outputs / "bench" / "results.md").exists()
    assert "ioisray: stopped by SIGTERM: benchmark: the search was interrupted; rerun the same command to resume" \
        in printed, printed[-3000:]
    for not_ours in ("Traceback", "SIGTERM received", "Stop signal received"):  # Tune's own stop notice included
        assert not_ours not in printed, printed[-3000:]


_STOPPED_IN_A_RAY_SESSION = """
import atexit, json, os, signal, sys, time
import ray
from ioisray import sigterm
from ioisray.config import load_config
from ioisray.recipes.launch import ray_session

sigterm.install()
atexit.register(lambda: print("python's exit handlers ran", flush=True))
try:
    with ray_session(load_config("configs/digits.yaml")):
        node = ray._private.worker._global_node
        print(json.dumps([i.process.pid for infos in node.all_processes.values() for i in infos]), flush=True)
        os.kill(os.getpid(), int(sys.argv[1]))
        time.sleep(30)
except KeyboardInterrupt:
    print(f"stopped; Ray still up: {ray.is_initialized()}", flush=True)
sigterm.exit(int(sys.argv[2]))
"""


@pytest.mark.ray
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_after_sigterm_the_local_ray_ends_with_the_command_and_nothing_waits_on_it(sig, code):
    # After SIGTERM the session leaves its local Ray alone (a SIGTERM to the whole job ends that Ray too, and
    # Ray's client ends this process at its first touch of it, before it can say anything); the command then
    # exits at once, ending the Ray's processes and removing their multiprocessing folders. Ctrl-C still
    # shuts Ray down in order and exits as usual.
    tmp = tempfile.mkdtemp(prefix="t", dir="/tmp")  # short: Ray's socket paths live under $TMPDIR
    try:
        proc = subprocess.run([sys.executable, "-c", _STOPPED_IN_A_RAY_SESSION, str(int(sig)), str(code)], cwd=ROOT,
                              env={**ENV, "TMPDIR": tmp}, capture_output=True, text=True, timeout=180,
                              preexec_fn=ctrl_c_as_usual)
        printed = proc.stdout + proc.stderr
        assert proc.returncode == code, printed[-3000:]
        ray_pids = json.loads(proc.stdout.splitlines()[0])
        assert ray_pids and f"stopped; Ray still up: {sig == signal.SIGTERM}" in printed, printed[-3000:]
        assert ("python's exit handlers ran" in printed) == (sig == signal.SIGINT), printed[-3000:]
        deadline = time.monotonic() + 30
        while (alive := [p for p in ray_pids if _running(p)]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive, alive
        assert not list(Path(tmp).glob("pymp-*"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
