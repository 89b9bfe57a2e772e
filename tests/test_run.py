"""A run's lifecycle without Ray: one process at a time holds a run, stale holds are taken over,
an unwritable output folder is one line, and nothing is written for a run refused before it starts."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest
from cli_utils import ENV, ROOT

from ioisray import lock as lock_module
from ioisray.cli import main
from ioisray.config import load_config
from ioisray.lock import LOCK_FILE, RunLock, RunLockedError
from ioisray.run import Run, run_dir

CE = ["train", str(ROOT / "configs/digits_ce.yaml"), "train.epochs=1", "model.name=resnet10t", "data.image_size=16"]


def hold_lock(location, name):
    """Another process holding the run (as a running `ioisray train` would), until it is killed."""
    code = (f"from ioisray.run import RunLock; l = RunLock({str(location)!r}, {name!r}); l.acquire(); "
            "print('held', flush=True); import time; time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_start_of_a_run_in_use_is_refused_in_one_line(tmp_path, capsys):
    cfg = load_config(ROOT / "configs/digits_ce.yaml", [f"output_dir={tmp_path}"])
    holder = hold_lock(run_dir(cfg), cfg.name)
    try:
        assert main([*CE, f"output_dir={tmp_path}"]) == 2
        err = capsys.readouterr().err
        assert f"run digits_ce is in use by pid {holder.pid} on host {socket.gethostname()}" in err
        assert len(err.strip().splitlines()) == 1
        assert not (run_dir(cfg) / "checkpoints").exists()  # it trained nothing
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_message(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is free now
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid,
                                                  "started_at": time.time(), "renewed_at": time.time()}))
    lock = RunLock(str(tmp_path), "r")
    lock.acquire()
    assert f"its holder, pid {dead.pid}, is no longer running" in capsys.readouterr().out
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == lock.me["pid"]
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_lock_of_another_host_holds_until_its_heartbeat_lapses(tmp_path, capsys, monkeypatch):
    def other_host(renewed_ago):
        (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "node-7", "pid": 1, "started_at": 0,
                                                      "renewed_at": time.time() - renewed_ago}))

    other_host(renewed_ago=5)
    with pytest.raises(RunLockedError, match="in use by pid 1 on host node-7"):
        RunLock(str(tmp_path), "r").acquire(wait=0.3)  # waited, then refused
    monkeypatch.setattr(lock_module, "HEARTBEAT_SECONDS", 0.2)
    other_host(renewed_ago=lock_module.STALE_AFTER_SECONDS + 30)
    lock = RunLock(str(tmp_path), "r")
    lock.acquire()
    assert "has not renewed it for" in capsys.readouterr().out
    first = json.loads((tmp_path / LOCK_FILE).read_text())["renewed_at"]
    time.sleep(0.6)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["renewed_at"] > first  # the heartbeat renews it
    lock.release()


def test_an_output_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "out").write_text("not a folder")
    assert main([*CE, f"output_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert "output_dir: cannot write the run folder" in err and str(tmp_path / "out") in err


def test_a_run_folder_is_only_made_once_its_inputs_are_checked(tmp_path):
    cfg = load_config(ROOT / "configs/digits_ce.yaml", [f"output_dir={tmp_path}"])
    run = Run(cfg).open()
    assert not run.dir.exists()  # the checks write nothing
    run.start(epochs=cfg.train.epochs)
    assert (run.dir / "config.yaml").is_file() and (run.dir / LOCK_FILE).is_file()
    run.close()
    assert not (run.dir / LOCK_FILE).exists()


def _start_at_once(location, barrier, results, tried):
    lock = RunLock(location, "r")
    barrier.wait()
    try:
        lock.acquire()
    except RunLockedError:
        results.put("refused")
        return
    results.put("held")
    tried.wait(30)  # hold it until both have tried
    lock.release()


def test_of_two_runs_started_at_the_same_instant_one_gets_the_lock(tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("fork")  # no Ray here; a fork starts at once
    for attempt in range(10):
        barrier, results, tried = ctx.Barrier(2), ctx.Queue(), ctx.Event()
        location = str(tmp_path / f"run{attempt}")
        procs = [ctx.Process(target=_start_at_once, args=(location, barrier, results, tried)) for _ in range(2)]
        for p in procs:
            p.start()
        outcomes = sorted(results.get(timeout=30) for _ in procs)
        tried.set()
        for p in procs:
            p.join(timeout=30)
        assert outcomes == ["held", "refused"], f"attempt {attempt}: {outcomes}"
        assert [p.exitcode for p in procs] == [0, 0]
        assert not list((tmp_path / f"run{attempt}").iterdir())  # released, and no temporary file left


def test_a_half_written_lock_is_taken_over(tmp_path, capsys):
    (tmp_path / LOCK_FILE).write_text('{"host": "node-7", "pi')
    lock = RunLock(str(tmp_path), "r")
    lock.acquire()
    assert "written only in part" in capsys.readouterr().out
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == lock.me["pid"]
    lock.release()


def test_a_lock_taken_over_on_a_uri_is_not_put_back_by_the_staging_copy(tmp_path, monkeypatch):
    # A run stopped without releasing its lock (killed, or ended by Ray's client) leaves it at the URI; the
    # rerun takes it over. The staging copy must not bring the dead process's lock back when it is uploaded.
    monkeypatch.setenv("IOISRAY_STAGING", str(tmp_path / "staging"))
    store = tmp_path / "store" / "r"
    store.mkdir(parents=True)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = {"host": socket.gethostname(), "pid": int(gone.stdout), "renewed_at": time.time()}
    (store / LOCK_FILE).write_text(json.dumps(stale))
    cfg = load_config(ROOT / "configs/digits_ce.yaml", [f"output_dir=file://{tmp_path / 'store'}", "name=r"])
    run = Run(cfg).open()
    run.start(epochs=cfg.train.epochs)
    run.push()  # as a run does after each of its steps
    assert json.loads((store / LOCK_FILE).read_text())["pid"] == os.getpid()
    run.close()
    assert not (store / LOCK_FILE).exists()
