"""Training state: what a checkpoint holds and how it is written and read.

One file, `state.pt`, written atomically and read with `weights_only=True` (tensors and plain Python
containers only), so a checkpoint cannot run code when loaded. `extra` is room for method state
such as IOIS's per-class accuracies and quotas.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ioisray.atomic import atomic_torch_save

STATE_FILE = "state.pt"


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

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / STATE_FILE
        atomic_torch_save(asdict(self), path)
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "TrainingState":
        path = Path(directory) / STATE_FILE
        try:
            data: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"checkpoint has no {STATE_FILE}: {path}") from None
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: unknown checkpoint fields {sorted(unknown)}")
        return cls(**data)
