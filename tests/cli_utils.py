"""Running the real `ioisray` entry point in a subprocess, and interrupting it like Ctrl-C would."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONUNBUFFERED="1", RAY_AUTH_MODE="disabled")


def run_cli(*args, timeout=300, env=None, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "ioisray.cli", *args], cwd=cwd, env={**ENV, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def latest_epoch(run: Path) -> int:
    """Epochs completed in the run's newest complete checkpoint (0: none yet)."""
    from ioisray.checkpoint import CheckpointStore

    names = CheckpointStore(run / "checkpoints").names()
    return int(names[-1].split("_")[1]) if names else 0


def ctrl_c_as_usual() -> None:
    """In the child, before it starts: SIGINT back to its default. A suite started in the background
    of a script (`cmd &` without job control) inherits SIGINT ignored, and Python then never turns
    it into KeyboardInterrupt: the Ctrl-C the tests send would be lost."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupt_after(args: list[str], run: Path, epochs: int, timeout: float = 240, env=None,
                    progress=None, cwd=ROOT) -> tuple[int, str]:
    """Start `ioisray *args`, send SIGINT once `epochs` epochs of `run` are checkpointed (or once
    `progress()`, if given, returns at least `epochs`); returns (epochs done, what it printed)."""
    progress = progress or (lambda: latest_epoch(run))
    log = run.parent / f".{run.name}-interrupted.log"
    run.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ioisray", *args], cwd=cwd, env={**ENV, **(env or {})},
                                stdout=out, stderr=subprocess.STDOUT, preexec_fn=ctrl_c_as_usual)
        try:
            deadline = time.time() + timeout
            while progress() < epochs and time.time() < deadline and proc.poll() is None:
                time.sleep(0.2)
            assert progress() >= epochs, "no checkpoint appeared:\n" + log.read_text()[-3000:]
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    return progress(), log.read_text()


def descendants(pid: int) -> set[int]:
    """`pid` and every process started under it (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, stack = set(), [pid]
    while stack:
        p = stack.pop()
        found.add(p)
        stack += children.get(p, [])
    return found
