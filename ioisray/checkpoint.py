"""Training state and the run's checkpoints: what a checkpoint holds, and how it is written, verified
and found again.

A checkpoint is a folder `<run>/checkpoints/epoch_<N>` (or `final`, the state after the test split)
holding `state.pt` (read with `weights_only=True`: tensors and plain containers only, so it cannot run
code when loaded), any extra files, and, written last, `manifest.json` with every file's SHA-256.
A folder without a manifest was interrupted (Ctrl-C, a full disk, a killed worker): it is not a
checkpoint and is removed the next time the run starts. A checkpoint whose files do not match their
checksums is skipped with a message, and the run resumes from the newest one that loads. The same
code writes to a local folder or a filesystem URI (s3://..., gs://...), from whichever node holds rank 0.
`extra` is room for method state such as IOIS's per-class accuracies and quotas.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch

from ioisray import storage

STATE_FILE = "state.pt"
MANIFEST = "manifest.json"
FINAL = "final"
_EPOCH_NAME = re.compile(r"^epoch_(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names it and says why."""


@dataclass
class TrainingState:
    epoch: int  # epochs completed: training resumes at this epoch
    model: dict
    optimizer: dict
    scheduler: dict
    best_model: Optional[dict] = None  # weights of the best epoch on validation
    best_metric: float = float("-inf")  # validation balanced accuracy of best_model
    best_epoch: int = -1
    best_val: dict = field(default_factory=dict)  # validation metrics of the best epoch
    # RNG: every epoch's random streams are seeded from (seed, rank, epoch), so the seed is all the
    # RNG state a resumed run needs to continue exactly (unseeded class-balanced draws excepted).
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        torch.save(asdict(self), buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, where: str = STATE_FILE) -> "TrainingState":
        try:
            loaded: dict[str, Any] = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - truncated zip, foreign pickle, ...: all mean "not a state"
            raise CheckpointError(f"{where} is not a training state ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:160] if str(e) else 'unreadable'})") from None
        if not isinstance(loaded, dict):
            raise CheckpointError(f"{where} is not a training state (holds {type(loaded).__name__})")
        unknown = set(loaded) - set(cls.__dataclass_fields__)
        if unknown:
            raise CheckpointError(f"{where}: unknown checkpoint fields {sorted(unknown)}")
        return cls(**loaded)

    def save(self, directory) -> None:
        """state.pt alone, written atomically (a benchmark's export; runs use CheckpointStore)."""
        storage.write_bytes(storage.join(str(directory), STATE_FILE), self.to_bytes())

    @classmethod
    def load(cls, directory) -> "TrainingState":
        where = storage.join(str(directory), STATE_FILE)
        try:
            return cls.from_bytes(storage.read_bytes(where), where)
        except FileNotFoundError:
            raise FileNotFoundError(f"checkpoint has no {STATE_FILE}: {where}") from None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class CheckpointStore:
    """The checkpoints of one run, in `location` (a local folder or a URI)."""

    def __init__(self, location: str, keep: int = 2):
        self.location, self.keep = str(location), keep

    def _path(self, name: str, *parts: str) -> str:
        return storage.join(self.location, name, *parts)

    def save(self, state: TrainingState, files: Optional[dict[str, bytes]] = None, name: Optional[str] = None) -> str:
        """Write a checkpoint (named `epoch_<state.epoch>`, or `name`), its manifest last; then drop all
        but the newest `keep` epoch checkpoints. Returns its name. On a write error (a full disk) the
        partial folder is removed before the error goes on."""
        name = name or f"epoch_{state.epoch:05d}"
        contents = {STATE_FILE: state.to_bytes(), **(files or {})}
        storage.delete(self._path(name))  # a partial folder of the same name from an interrupted try
        try:
            for file, data in contents.items():
                storage.write_bytes(self._path(name, file), data)
            manifest = {"epoch": state.epoch, "files": {f: _sha256(d) for f, d in contents.items()}}
            storage.write_bytes(self._path(name, MANIFEST), json.dumps(manifest).encode())
        except BaseException:
            storage.delete(self._path(name))
            raise
        for old in self.names()[:-self.keep] if self.keep else []:
            storage.delete(self._path(old))
        return name

    def names(self) -> list[str]:
        """Complete epoch checkpoints (with a manifest), oldest first; `final` is not among them."""
        found = []
        for n in storage.list_dir(self.location):
            m = _EPOCH_NAME.match(n)
            if m and self._complete(n):
                found.append((int(m.group(1)), n))
        return [n for _, n in sorted(found)]

    def latest_epoch(self) -> int:
        """Epochs the newest complete epoch checkpoint holds (0: none)."""
        names = self.names()
        return int(_EPOCH_NAME.match(names[-1]).group(1)) if names else 0

    def complete(self, name: str) -> bool:
        """Whether checkpoint `name` was written to the end (its manifest is there)."""
        return self._complete(name)

    def _complete(self, name: str) -> bool:
        try:
            storage.read_bytes(self._path(name, MANIFEST))
            return True
        except FileNotFoundError:
            return False

    def files(self, name: str) -> list[str]:
        """The files a complete checkpoint holds (its manifest's list)."""
        try:
            return sorted(json.loads(storage.read_bytes(self._path(name, MANIFEST)))["files"])
        except FileNotFoundError:
            raise CheckpointError(f"{self._path(name)} is incomplete (no {MANIFEST})") from None

    def read(self, name: str, file: str) -> bytes:
        """One file of a checkpoint, checked against its manifest."""
        where = self._path(name)
        try:
            manifest = json.loads(storage.read_bytes(self._path(name, MANIFEST)))
            expected = manifest["files"][file]
        except FileNotFoundError:
            raise CheckpointError(f"{where} is incomplete (no {MANIFEST}: it was being written when the run "
                                  f"stopped)") from None
        except (ValueError, KeyError, TypeError):
            raise CheckpointError(f"{where}/{MANIFEST} is unreadable or does not list {file}") from None
        try:
            data = storage.read_bytes(self._path(name, file))
        except FileNotFoundError:
            raise CheckpointError(f"{where} has no {file}") from None
        if _sha256(data) != expected:
            raise CheckpointError(f"{where}/{file} does not match its checksum (truncated or changed after it "
                                  f"was written)")
        return data

    def load(self, name: str) -> TrainingState:
        return TrainingState.from_bytes(self.read(name, STATE_FILE), self._path(name, STATE_FILE))

    def latest(self, log=print) -> Optional[tuple[str, TrainingState]]:
        """(name, state) of the newest checkpoint that verifies and loads, the final one first, or None.
        Newer ones that do not are reported through `log` and skipped (kept on disk, for a look)."""
        for name in ([FINAL] if self._complete(FINAL) else []) + list(reversed(self.names())):
            try:
                state = self.load(name)
            except CheckpointError as e:
                log(f"[ioisray] warning: skipping checkpoint {name}: {e}")
                continue
            return name, state
        return None

    def remove_partial(self, log=print) -> list[str]:
        """Remove folders of checkpoints that were never completed (no manifest); their names."""
        partial = [n for n in storage.list_dir(self.location) if not self._complete(n)]
        for n in partial:
            storage.delete(self._path(n))
        if partial:
            log(f"[ioisray] removed {len(partial)} incomplete checkpoint folder(s) of an interrupted run: "
                f"{', '.join(partial)}")
        return partial
