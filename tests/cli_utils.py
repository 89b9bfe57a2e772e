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

    return CheckpointStore(run / "checkpoints").latest_epoch()


def ctrl_c_as_usual() -> None:
    """In the child, before it starts: SIGINT back to its default. A suite started in the background
    of a script (`cmd &` without job control) inherits SIGINT ignored, and Python then never turns
    it into KeyboardInterrupt: the Ctrl-C the tests send would be lost."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupt_after(args: list[str], run: Path, epochs: int, timeout: float = 240, env=None,
                    progress=None, cwd=ROOT, sig=signal.SIGINT, group=False) -> tuple[int, str, int]:
    """Start `ioisray *args`, send `sig` (Ctrl-C's SIGINT by default) once `epochs` epochs of `run` are
    checkpointed (or once `progress()`, if given, returns at least `epochs`); returns (epochs done,
    what it printed, its exit code). `group`: to every process it started as well (its Ray's), as
    systemd and Slurm send SIGTERM to every process of a service or job."""
    progress = progress or (lambda: latest_epoch(run))
    log = run.parent / f".{run.name}-interrupted.log"
    run.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ioisray", *args], cwd=cwd, env={**ENV, **(env or {})},
                                stdout=out, stderr=subprocess.STDOUT, preexec_fn=ctrl_c_as_usual,
                                start_new_session=group)
        try:
            deadline = time.time() + timeout
            while progress() < epochs and time.time() < deadline and proc.poll() is None:
                time.sleep(0.2)
            assert progress() >= epochs, "no checkpoint appeared:\n" + log.read_text()[-3000:]
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    return progress(), log.read_text(), proc.returncode


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


def _listening_sockets() -> dict[int, tuple[str, int]]:
    """Socket inode -> (address, port) of every listening TCP socket of this network namespace (Linux
    /proc/net/tcp and tcp6; addresses are hex, in host byte order per 32-bit word)."""
    import ipaddress
    import struct

    found = {}
    for name in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] != "0A":  # LISTEN
                continue
            hex_addr, hex_port = fields[1].split(":")
            raw = b"".join(struct.pack("<I", int(hex_addr[i:i + 8], 16)) for i in range(0, len(hex_addr), 8))
            found[int(fields[9])] = (str(ipaddress.ip_address(raw)), int(hex_port, 16))
    return found


def listeners(pids: set[int]) -> set[tuple[int, str, int]]:
    """(pid, address, port) of every TCP socket that one of `pids` listens on."""
    sockets = _listening_sockets()
    out = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and int(target[8:-1]) in sockets:
                out.add((pid, *sockets[int(target[8:-1])]))
    return out


def is_loopback(address: str) -> bool:
    import ipaddress

    ip = ipaddress.ip_address(address)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


class ListenerWatch:
    """While the block runs, every TCP listener of the processes under `root` (default: this process):
    `seen`, the names of the processes seen listening; `outside`, (process name, address, port) of each
    listener on an address other than loopback."""

    def __init__(self, root: int | None = None, every: float = 0.5):
        import threading

        self.root, self.every = root or os.getpid(), every
        self.seen: set[str] = set()
        self.outside: set[tuple[str, str, int]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.wait(self.every):
            for pid, address, port in listeners(descendants(self.root) - {os.getpid()}):
                try:
                    name = Path(f"/proc/{pid}/comm").read_text().strip()
                except OSError:
                    name = "?"
                self.seen.add(name)
                if not is_loopback(address):
                    self.outside.add((name, address, port))

    def __enter__(self) -> "ListenerWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
