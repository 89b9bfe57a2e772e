"""The command's first process waits for its work in a child (ioisray/supervisor.py) and reports a stop
that Ray kept the child from reporting. Real processes, no Ray: the child's work starts a real run (its
lock), makes a folder as Ray's dashboard does, and then the SIGTERM comes; where Ray's client would end
the child silently (exit code 1), the child here does exactly that."""
import contextlib
import os
import pty
import signal
import subprocess
import sys

import pytest
from cli_utils import ENV, ROOT

CHILD = """
import os, signal, sys, time
from ioisray import supervisor
from ioisray.config import load_config
from ioisray.run import Run

out, ending = sys.argv[1], sys.argv[2]

def work():
    run = Run(load_config("configs/digits_ce.yaml", [f"output_dir={out}", "name=stopped"])).open()
    run.start(epochs=3)
    os.makedirs(os.path.join(os.environ["TMPDIR"], "pymp-dashboard"))  # what Ray's dashboard leaves
    if ending == "finishes":
        run.close()
        return 0
    if ending == "says_it":
        def stop(signum, frame):
            print("ioisray: stopped by SIGTERM: said by the child", file=sys.stderr, flush=True)
            supervisor.report(said=True)
            run.close()
            os._exit(143)
    else:  # as Ray's client ends a process whose Ray the SIGTERM ended: at once, exit code 1, nothing said
        def stop(signum, frame):
            os._exit(1)
    signal.signal(signal.SIGTERM, stop)
    os.kill(os.getppid(), signal.SIGTERM)  # `kill`, docker stop: to the command's first process only
    time.sleep(60)
    return 0

supervisor.run(work)
"""


@pytest.mark.parametrize("ending", ["ended_silently", "says_it", "finishes"])
def test_a_stop_is_reported_and_the_run_released_even_when_the_child_cannot(tmp_path, ending):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "out"), ending], cwd=ROOT,
                          env={**ENV, "TMPDIR": str(tmp)}, capture_output=True, text=True, timeout=120)
    printed = proc.stdout + proc.stderr
    lock = tmp_path / "out" / "stopped" / ".lock"
    if ending == "finishes":
        assert proc.returncode == 0 and "stopped by SIGTERM" not in printed, printed
        assert not lock.exists() and (tmp / "pymp-dashboard").is_dir()  # not the parent's to remove
        return
    assert proc.returncode == 143, printed
    assert not list(tmp.glob("ioisray-command-*")), list(tmp.iterdir())  # the parent's report file
    if ending == "says_it":  # the child's own stop: nothing more to say, but a folder it left is removed
        assert printed.count("stopped by SIGTERM") == 1 and "said by the child" in printed, printed
        assert not lock.exists() and not (tmp / "pymp-dashboard").exists()
        return
    assert "ioisray: stopped by SIGTERM: run stopped interrupted at epoch 1 of 3 (0 saved); rerun the same " \
           "command to resume" in printed, printed
    # The child's lock released (a rerun would otherwise take it over with a message), the folder removed.
    assert not lock.exists() and not (tmp / "pymp-dashboard").exists(), printed


def test_the_command_passes_its_exit_code_and_output_through(tmp_path):
    # `python -m ioisray` runs the command in the child: a config error still exits 2 with its one line.
    proc = subprocess.run([sys.executable, "-m", "ioisray", "train", str(tmp_path / "missing.yaml")], cwd=ROOT,
                          env={**ENV, "TMPDIR": str(tmp_path)}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "missing.yaml" in proc.stderr, proc.stderr
    assert not list(tmp_path.glob("ioisray-command-*"))


NESTED = """
import os, signal, sys, time
from ioisray import supervisor
from ioisray.config import load_config
from ioisray.run import Run

def work():
    out = sys.argv[1]
    with Run(load_config("configs/digits.yaml", [f"output_dir={out}", "name=iois"])).open() as run:
        run.start(epochs=15)
        with Run(load_config("configs/digits_ce.yaml", [f"output_dir={out}", "name=baseline"])).open() as base:
            base.start(epochs=4)  # a job's baseline, trained first, inside the run
        signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(1))  # as Ray's client, see CHILD
        os.kill(os.getppid(), signal.SIGTERM)
        time.sleep(60)

supervisor.run(work)
"""


def test_after_a_jobs_baseline_the_stop_is_reported_for_the_run_that_holds_it(tmp_path):
    proc = subprocess.run([sys.executable, "-c", NESTED, str(tmp_path)], cwd=ROOT, env={**ENV, "TMPDIR": str(tmp_path)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 143, proc.stderr
    assert "ioisray: stopped by SIGTERM: run iois interrupted at epoch 1 of 15 (0 saved)" in proc.stderr, proc.stderr
    assert not (tmp_path / "iois" / ".lock").exists()


CTRL_C = """
import os, signal, sys, time
from ioisray import supervisor

def work():
    got = []
    signal.signal(signal.SIGINT, lambda signum, frame: got.append(signum))
    print("ready", flush=True)
    deadline = time.monotonic() + 30
    while not got and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # a second one, if the parent passed on one the child had had already, arrives here
    print(f"Ctrl-C {len(got)} time(s)", flush=True)
    return 130

supervisor.run(work)
"""


@pytest.mark.parametrize("typed", [True, False])
def test_ctrl_c_reaches_the_work_once_typed_in_a_terminal_or_sent_to_the_command(typed):
    # Typed in a terminal, the kernel sends SIGINT to every process of the foreground group, the child
    # included. Sent with kill to the command's first process (as tests, IDEs and notebooks do), the first
    # process passes it on. Either way the work stops once, and the command exits 130.
    pid, terminal = pty.fork()
    if pid == 0:  # the command, in a new session whose controlling terminal is the pty
        os.chdir(ROOT)
        os.execve(sys.executable, [sys.executable, "-c", CTRL_C], ENV)
    printed = b""
    try:
        while b"ready" not in printed:
            printed += os.read(terminal, 1024)
        if typed:
            os.write(terminal, b"\x03")  # Ctrl-C
        else:
            os.kill(pid, signal.SIGINT)
        _, status = os.waitpid(pid, 0)
        with contextlib.suppress(OSError):  # the pty reports EIO once everything on it has exited
            while chunk := os.read(terminal, 1024):
                printed += chunk
    finally:
        os.close(terminal)
    assert os.waitstatus_to_exitcode(status) == 130, printed
    assert b"Ctrl-C 1 time(s)" in printed, printed
