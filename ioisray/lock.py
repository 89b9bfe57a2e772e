"""A run's lock: its name held by one process at a time, with a heartbeat, taken over from a process
that is gone."""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Optional

from ioisray import storage

LOCK_FILE = ".lock"
HEARTBEAT_SECONDS = 20.0
STALE_AFTER_SECONDS = 90.0  # a lock not renewed for this long belongs to a process that is gone


class RunLockedError(RuntimeError):
    """Another live process runs this run; the message names it."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class RunLock:
    """The run's name, held by one process: `.lock` in the run's folder holds its host, pid and a
    heartbeat renewed every HEARTBEAT_SECONDS by a daemon thread. A lock of a dead process on this host,
    or one not renewed for STALE_AFTER_SECONDS (its holder's machine is gone), is taken over with a
    message; any other is refused, or waited for up to `wait` seconds. On a URI this is a lease, good
    enough for the processes of one cluster, not a distributed lock."""

    def __init__(self, location: str, name: str):
        self.path, self.name = storage.join(location, LOCK_FILE), name
        self.me = {"host": socket.gethostname(), "pid": os.getpid()}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _holder(self) -> Optional[dict]:
        try:
            return json.loads(storage.read_bytes(self.path))
        except FileNotFoundError:
            return None
        except ValueError:  # half-written (by a process killed mid-write, or a lease write on a URI)
            return {}

    def _why_taken(self, holder: dict) -> Optional[str]:
        """Why `holder`'s lock may be taken over (None: it may not)."""
        if not holder:
            return "its lock file was written only in part"
        age = time.time() - float(holder.get("renewed_at", 0))
        if holder.get("host") == self.me["host"]:
            if holder.get("pid") == self.me["pid"]:
                return "it is this process's own"
            if not _alive(int(holder.get("pid", -1))):
                return f"its holder, pid {holder.get('pid')}, is no longer running"
            return None
        if age > STALE_AFTER_SECONDS:
            return f"its holder on host {holder.get('host')} has not renewed it for {age:.0f} s"
        return None

    def acquire(self, wait: float = 0.0) -> None:
        deadline = time.monotonic() + wait
        while True:
            holder = self._holder()
            why = None if holder is None else self._why_taken(holder)
            if holder is None or why is not None:
                if self._claim(holder):
                    break
                continue  # another process took it first: look again at who holds it now
            if time.monotonic() >= deadline:
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started_at", 0))))
                raise RunLockedError(
                    f"run {self.name} is in use by pid {holder.get('pid')} on host {holder.get('host')} (since "
                    f"{since}): wait for it to finish or stop it, or choose another name=...")
            time.sleep(min(5.0, max(0.1, deadline - time.monotonic())))
        if holder is not None and why != "it is this process's own":
            print(f"[ioisray] taking over the lock of run {self.name}: {why}", flush=True)
        self._thread = threading.Thread(target=self._renew, name="ioisray-run-lock", daemon=True)
        self._thread.start()

    def _claim(self, stale: Optional[dict]) -> bool:
        """Write this process's lock where there was none (`stale` None) or `stale`'s, which may be taken
        over; False if another process claimed it first. In a local folder the claim is one exclusive
        step (a complete file linked into place, which fails if one is there), so of two runs started
        at the same instant one gets the lock; on a URI it is a write (a lease, see the class)."""
        self.me["started_at"] = time.time()
        if storage.is_uri(self.path):
            self._write()
            return True
        if stale is not None and not self._set_aside(stale):
            return False
        tmp = f"{self.path}.{self.me['pid']}.{threading.get_ident()}.tmp"
        storage.write_bytes(tmp, self._content())
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def _set_aside(self, stale: dict) -> bool:
        """Move `stale`'s lock file out of the way, if it is still that one (another process taking it
        over at the same time gets there first, or already put its own in place)."""
        aside = f"{self.path}.{self.me['pid']}.{threading.get_ident()}.stale"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return True  # gone already: claim it by the exclusive step
        try:
            with open(aside) as f:
                moved = json.loads(f.read())
        except ValueError:
            moved = {}
        if moved == stale or not stale:
            os.unlink(aside)
            return True
        try:  # we moved a newer holder's lock: put it back unless yet another is in place
            os.link(aside, self.path)
        except FileExistsError:
            pass
        os.unlink(aside)
        return False

    def _content(self) -> bytes:
        return json.dumps({**self.me, "renewed_at": time.time()}).encode()

    def _write(self) -> None:
        storage.write_bytes(self.path, self._content())

    def _renew(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                self._write()
            except OSError:  # a full disk or a lost mount: the lease lapses, the run goes on
                pass

    def release(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self.release_for(self.me["pid"])

    def release_for(self, pid: int) -> None:
        """Remove the lock if process `pid` of this host holds it (this process, or one that ended holding it)."""
        holder = self._holder()
        if holder and (holder.get("host"), holder.get("pid")) == (self.me["host"], pid):
            storage.delete(self.path)
