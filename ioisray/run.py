"""A run's folder and its life, in one place: where it is, whether it has finished or may resume, the
lock that gives it to one process at a time, and what it keeps (config, checkpoints, results).

    <output_dir>/<name>/      the run (output_dir: a local folder, or a filesystem URI; see storage.py)
        config.yaml           the resolved config, reloadable as is
        .lock                 who runs it now: host, pid and a heartbeat
        checkpoints/          epoch_<N>/ and final/ (ioisray/checkpoint.py)
        ray_train/            Ray Train's own records
        metrics.json, ...     results, written atomically when the run ends: then it has finished

Every recipe opens its run the same way: `with Run(cfg) as run:` checks, before anything is written,
that it has not finished (its test split was used once already) and that a run with checkpoints
resumes only under the config it started with (only `ray.*` may change); once the recipe has checked
its inputs, `run.start()` makes the folder, takes the lock (a run held by a live process is refused,
a lock left by a dead one taken over), removes checkpoint folders an interruption left half-written
and saves the config.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Optional

from ioisray import storage
from ioisray.checkpoint import CheckpointStore
from ioisray.config import Config, ConfigError, RunFinishedError, load_config, save_config

LOCK_FILE = ".lock"
HEARTBEAT_SECONDS = 20.0
STALE_AFTER_SECONDS = 90.0  # a lock not renewed for this long belongs to a process that is gone


class RunLockedError(RuntimeError):
    """Another live process runs this run; the message names it."""


class RunInterrupted(RuntimeError):
    """The run was stopped (Ctrl-C) before it finished; the message says where and how to resume."""


def run_dir(cfg: Config) -> Path:
    """The local folder the driver writes: the run itself, or the staging copy of a URI run."""
    if storage.is_uri(cfg.output_dir):
        return storage.staging_dir(cfg.output_dir) / cfg.name
    return Path(cfg.output_dir).expanduser().resolve() / cfg.name


def run_location(cfg: Config) -> str:
    """Where the run's outputs end up: run_dir, or <output_dir>/<name> for a URI output_dir."""
    if storage.is_uri(cfg.output_dir):
        return storage.join(cfg.output_dir, cfg.name)
    return str(run_dir(cfg))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


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
        holder = self._holder()
        if holder and (holder.get("host"), holder.get("pid")) == (self.me["host"], self.me["pid"]):
            storage.delete(self.path)


class Run:
    """One run of a recipe. `done_file`: what exists once the run has finished (metrics.json for a
    training run, the model folder for a pretraining run)."""

    def __init__(self, cfg: Config, done_file: str = "metrics.json", lock_wait: float = 0.0,
                 when_finished: str = "its test split was used once already"):
        self.cfg, self.done_file, self.lock_wait, self.when_finished = cfg, done_file, lock_wait, when_finished
        self.dir, self.location = run_dir(cfg), run_location(cfg)
        self.checkpoints = CheckpointStore(storage.join(self.location, storage.CHECKPOINTS))
        self.lock = RunLock(self.location, cfg.name)

    # -- the questions every recipe asks first --------------------------------------------------

    def pull(self) -> "Run":
        """A URI run's small files, downloaded into the staging folder (to resume, or to see that it
        has finished); a URI pyarrow cannot open is an error naming output_dir."""
        if storage.is_uri(self.cfg.output_dir):
            try:
                storage.pull(self.dir, self.location)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        return self

    @property
    def finished(self) -> bool:
        return (self.dir / self.done_file).exists()

    def has_checkpoints(self) -> bool:
        return bool(storage.list_dir(self.checkpoints.location))

    def check_resumable(self, started: Optional[bool] = None) -> None:
        """A run that has started (default: it has checkpoints) resumes only under the config it started
        with. Another seed or split fraction would, for instance, change the split under a half-trained
        model and let it be selected or tested on images it trained on. Only `ray.*` (where it runs) may
        change."""
        old_path = self.dir / "config.yaml"
        if not old_path.is_file() or not (self.has_checkpoints() if started is None else started):
            return
        old = _flatten(load_config(old_path).model_dump(mode="json"))
        new = _flatten(self.cfg.model_dump(mode="json"))
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and not k.startswith("ray."))
        if changed:
            raise ConfigError(f"{self.dir} holds checkpoints of a run started with other values of "
                              f"{', '.join(changed)} (see its config.yaml); resume it with the same values "
                              f"or choose another name=...")

    # -- the life of the run --------------------------------------------------------------------

    def open(self) -> "Run":
        """The checks, before anything is written: a finished run is refused, and a run with
        checkpoints resumes only under its own config."""
        self.pull()
        if self.finished:
            raise RunFinishedError(f"{self.dir / self.done_file} already exists: run {self.cfg.name} has finished "
                                   f"({self.when_finished}). Choose another name=...")
        self.check_resumable()
        return self

    def start(self) -> "Run":
        """Once the run's inputs are known to be good: its folder, its lock, its config. Checkpoint folders
        an interruption left half-written are removed (the lock makes sure no live run is writing them)."""
        self._make_folder()
        self.lock.acquire(wait=self.lock_wait)
        self.checkpoints.remove_partial()
        save_config(self.cfg, self.dir / "config.yaml")
        self.push()
        return self

    def _make_folder(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise ConfigError(f"output_dir: cannot write the run folder {self.dir} ({e.strerror or e})") from None

    def close(self) -> None:
        self.lock.release()

    def __enter__(self) -> "Run":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def finish(self, results: dict, table: str, files: dict[str, bytes]) -> None:
        """The run's results: `files` (name -> bytes) and metrics.md (`table`), then metrics.json, which
        marks the run finished, all written atomically, then uploaded."""
        from ioisray.atomic import atomic_write_bytes, atomic_write_text

        for name, data in files.items():
            atomic_write_bytes(self.dir / name, data)
        atomic_write_text(self.dir / "metrics.md", table + "\n")
        atomic_write_text(self.dir / self.done_file, json.dumps(results, indent=2))
        self.push()

    def drop_checkpoints(self) -> None:
        """Once the run has finished: its checkpoints go, unless train.keep_checkpoints."""
        if not self.cfg.train.keep_checkpoints:
            storage.delete(self.checkpoints.location)

    def push(self) -> None:
        """The staging folder's files to the run's URI (nothing to do for a local run)."""
        storage.push(self.dir, self.location)

    def latest_epoch(self) -> int:
        """Epochs the run's newest checkpoint holds (0: none)."""
        names = self.checkpoints.names()
        return int(names[-1].split("_")[1]) if names else 0

    def interrupted(self, epochs: int) -> RunInterrupted:
        done = self.latest_epoch()
        return RunInterrupted(f"run {self.cfg.name} interrupted at epoch {min(done + 1, epochs)} of {epochs} ({done} "
                              f"saved); rerun the same command to resume")

    def uri(self, relative: str) -> str:
        return storage.join(self.location, relative)
