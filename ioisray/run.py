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
its inputs, `run.start(epochs)` makes the folder, takes the lock (a run held by a live process is refused,
a lock left by a dead one taken over), removes checkpoint folders an interruption left half-written
and saves the config.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from ioisray import storage, supervisor
from ioisray.checkpoint import CheckpointStore
from ioisray.config import Config, ConfigError, RunFinishedError, load_config, save_config
from ioisray.lock import LOCK_FILE, RunLock


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


class Run:
    """One run of a recipe. `done_file`: what exists once the run has finished (metrics.json for a
    training run, the model folder for a pretraining run)."""

    def __init__(self, cfg: Config, done_file: str = "metrics.json", lock_wait: float = 0.0,
                 when_finished: str = "its test split was used once already"):
        self.cfg, self.done_file, self.lock_wait, self.when_finished = cfg, done_file, lock_wait, when_finished
        self.dir, self.location = run_dir(cfg), run_location(cfg)
        self.checkpoints = CheckpointStore(storage.join(self.location, storage.CHECKPOINTS))
        self.lock = RunLock(self.location, cfg.name)
        self._reported_before: Optional[dict] = None

    # -- the questions every recipe asks first --------------------------------------------------

    def pull(self) -> "Run":
        """A URI run's small files, downloaded into the staging folder (to resume, or to see that it
        has finished); a URI pyarrow cannot open is an error naming output_dir."""
        if storage.is_uri(self.cfg.output_dir):
            try:
                # Not the lock: a copy of a lock left by a process that is gone, pushed back with the run's
                # files, would replace the lock this process takes over and outlive the run.
                storage.pull(self.dir, self.location, leave_out=(LOCK_FILE,))
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

    def start(self, epochs: int) -> "Run":
        """Once the run's inputs are known to be good: its folder, its lock, its config. Checkpoint folders
        an interruption left half-written are removed (the lock makes sure no live run is writing them).
        The command's waiting parent is told of the run (of `epochs` epochs), to say where it stopped if
        Ray ends this process first (ioisray/supervisor.py)."""
        self._make_folder()
        self.lock.acquire(wait=self.lock_wait)
        self._reported_before = supervisor.report(run={"name": self.cfg.name, "location": self.location,
                                                       "epochs": epochs, "checkpoints": self.checkpoints.location})
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
        if self._reported_before and self._reported_before["run"]:  # the run holding this one runs again
            supervisor.report(**self._reported_before)
        self._reported_before = None

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
        return self.checkpoints.latest_epoch()

    def interrupted(self, epochs: int) -> RunInterrupted:
        return RunInterrupted(supervisor.interrupted_message(self.cfg.name, self.latest_epoch(), epochs))

    def uri(self, relative: str) -> str:
        return storage.join(self.location, relative)
