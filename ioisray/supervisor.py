"""The `ioisray` command does its work in a child process and waits for it, so that a stop is always
reported. A SIGTERM sent to every process of a job (systemd, Slurm) also ends the local Ray the command
started, and Ray's client can end the process that holds it, within a tenth of a second, with exit code
1 and nothing said: its object store client exits the process when it finds the store gone (Ray's
plasma StoreConn), and its own threads touch the store as soon as the node is reported dead. The parent
holds no Ray. When the child ends so after a SIGTERM, the parent says where the run stopped, releases
the run's lock, removes the Ray's temporary folders, and exits 143, as the child would have.

The child tells the parent what it is running (`report`), in a small file the parent reads once the
child has ended.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from typing import Callable, NoReturn

from ioisray import pymp, sigterm

_report_path: str | None = None  # set in the child
_reported: dict = {}


def report(**what) -> dict:
    """Tell the waiting parent what this command is doing: `run={"name", "location", "checkpoints",
    "epochs"}` while a run runs, `stop="..."` for what to say of a stopped search, `said=True` once the
    command has said how it stopped; returns what these keys said before (to report again once the inner
    thing is done: a job's baseline runs inside its run). A no-op outside a supervised command (a trial's
    process, a test)."""
    before = {k: _reported.get(k) for k in what}
    if _report_path is None:
        return before
    _reported.update(what)
    with contextlib.suppress(OSError):
        tmp = f"{_report_path}.tmp"
        with open(tmp, "w") as f:
            json.dump(_reported, f)
        os.replace(tmp, _report_path)
    return before


def run(work: Callable[[], int]) -> NoReturn:
    """Exit with what `work()` returns, having run it in a child process (where fork and sigwaitinfo
    exist: Linux)."""
    global _report_path
    if not (hasattr(os, "fork") and hasattr(signal, "sigwaitinfo")):
        sigterm.exit(work())
    fd, path = tempfile.mkstemp(prefix="ioisray-command-", suffix=".json")
    os.close(fd)
    folders_before = pymp.folders()
    waited = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD}
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, waited)  # the parent takes them one by one, below
    child = os.fork()
    if child == 0:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        _report_path = path
        sigterm.exit(work())
    terminated, status = False, None
    while status is None:
        got = signal.sigwaitinfo(waited)
        if got.si_signo == signal.SIGCHLD:
            pid, wait_status = os.waitpid(child, os.WNOHANG)
            status = wait_status if pid == child else None
            continue
        # Passed on when a process sent it to this one only (docker stop, `timeout`, `kill`); a Ctrl-C typed
        # in a terminal (sent by the kernel) reached the child too. SIGTERM twice is harmless (sigterm.py).
        terminated |= got.si_signo == signal.SIGTERM
        if got.si_signo == signal.SIGTERM or got.si_code <= 0:  # SI_USER, SI_QUEUE, SI_TKILL: by kill()
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, got.si_signo)
    code = os.waitstatus_to_exitcode(status)
    code = 128 - code if code < 0 else code  # ended by a signal: as a shell reports it
    what = _read(path)
    for leftover in (path, f"{path}.tmp"):
        with contextlib.suppress(OSError):
            os.unlink(leftover)
    if terminated and code != 0:
        if code != sigterm.EXIT_CODE or not what.get("said"):  # the child did not finish its own stop
            if not what.get("said"):
                print(f"ioisray: stopped by SIGTERM: {_where_it_stopped(what)}", file=sys.stderr, flush=True)
            _release(what.get("run"), child)
        # Also after the child's own stop: a folder whose listener was still ending when the child left.
        _remove_left_folders(pymp.folders() - folders_before)
        code = sigterm.EXIT_CODE
    sys.exit(code)


def interrupted_message(name: str, done: int, epochs: int) -> str:
    """Where a run stopped, `done` of its `epochs` saved, and how to resume it."""
    return f"run {name} interrupted at epoch {min(done + 1, epochs)} of {epochs} ({done} saved); rerun the same " \
           f"command to resume"


def _read(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _where_it_stopped(what: dict) -> str:
    if run := what.get("run"):
        from ioisray.checkpoint import CheckpointStore

        return interrupted_message(run["name"], CheckpointStore(run["checkpoints"]).latest_epoch(), run["epochs"])
    return what.get("stop", "interrupted; rerun the same command to resume")


def _release(run: dict | None, child: int) -> None:
    """The run's lock, if the child still holds it."""
    if not run:
        return
    from ioisray.lock import RunLock

    RunLock(run["location"], run["name"]).release_for(child)


def _remove_left_folders(new: set[str], wait: float = 5.0) -> None:
    """Those of `new` (made while the child ran) where nothing listens any more, once the processes of the
    Ray that the SIGTERM ended are gone."""
    deadline = time.monotonic() + wait
    while new:
        pymp.remove(set(), new)
        new = {f for f in new if os.path.isdir(f)}
        if not new or time.monotonic() > deadline:
            return
        time.sleep(0.2)
