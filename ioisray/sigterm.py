"""SIGTERM, what docker stop, systemd, Kubernetes, Slurm and `timeout` send, stops an `ioisray` command
as Ctrl-C does: at the next safe point, keeping what is saved, saying where the run stopped; the
command then exits 143 (128 + SIGTERM).

`ioisray` (cli.main) installs the handler for the whole command. Ray replaces it when it starts in the
driver (ray.init sets a handler that exits at once, and its core worker a C++ one that prints a stack
dump and aborts), so the Ray session puts it back once Ray is up (recipes/launch.ray_session).

A SIGTERM sent to every process of a job (systemd, Slurm) also ends the local Ray the command started,
and Ray's client then ends the command itself, exit code 1 and nothing said, at its first touch of the
gone raylet's object store, which its own threads can make within a tenth of a second. So after a
SIGTERM the command does not shut that Ray down: it says where the run stopped, releases the run, and
leaves at once, ending the Ray's processes on the way out (`end_with_the_command`, `exit`); and where
Ray's client ends the process first, the command's first process, which only waits for it, reports the
stop (ioisray/supervisor.py).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Callable, NoReturn

EXIT_CODE = 128 + signal.SIGTERM

_installed = False
_received = threading.Event()
_on_exit: list[Callable[[], None]] = []


def _on_sigterm(signum, frame) -> None:
    if _received.is_set():
        return  # the stop is under way; Kubernetes and systemd follow up with SIGKILL if it takes too long
    _received.set()
    on_ctrl_c = signal.getsignal(signal.SIGINT)
    if callable(on_ctrl_c):  # Python's (KeyboardInterrupt), or Ray Tune's, which stops and saves the search
        on_ctrl_c(signal.SIGINT, frame)
    else:  # SIGINT ignored (a command started in the background) or left to the system
        raise KeyboardInterrupt


def install():
    """Treat SIGTERM as Ctrl-C in this process, until `uninstall(what this returns)`; a no-op outside the
    main thread (where Python cannot set handlers)."""
    global _installed
    if threading.current_thread() is not threading.main_thread():
        return None
    _received.clear()
    before = signal.signal(signal.SIGTERM, _on_sigterm)
    _installed = True
    return before


def uninstall(before) -> None:
    global _installed
    if before is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, before)
        _installed = False


def reinstall() -> None:
    """Put the handler back after something (Ray) replaced it, if `install` put it in place."""
    if _installed and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def installed() -> bool:
    return _installed


def received() -> bool:
    """Whether SIGTERM has stopped this command."""
    return _received.is_set()


def mark_received() -> None:
    """SIGTERM reached a handler other than ours (Ray's, while Ray starts): the stop is one all the same."""
    _received.set()


def end_with_the_command(ending: Callable[[], None]) -> None:
    """Call `ending` (what ends something the command started, without waiting on it) as the command
    exits, instead of a graceful stop now; see the module's docstring."""
    _on_exit.append(ending)


def exit(code: int) -> NoReturn:  # noqa: A001 - the command's exit
    """Exit the command with `code`: as usual, or, once something was left to end with the command, at
    once after ending it, without Python's exit handlers (Ray's would wait on the Ray that is gone)."""
    if not _on_exit:
        sys.exit(code)
    for ending in _on_exit:
        try:
            ending()
        except Exception:  # noqa: BLE001 - the exit goes on; what was not ended ends with its parent gone
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
