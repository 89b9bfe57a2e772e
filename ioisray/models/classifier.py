"""The classifier: any timm model by name, never downloaded; pretrained only from a local file."""
from __future__ import annotations

from pathlib import Path

import timm
import torch

from ioisray.config import ModelConfig


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read weights without unpickling arbitrary objects (safetensors, or torch.load weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.weights: no such file: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    # Accept common wrappers: {"state_dict": ...} or {"model": ...}.
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"model.weights: {path} does not hold a state dict")
    return state


def create_classifier(cfg: ModelConfig, num_classes: int) -> torch.nn.Module:
    try:
        model = timm.create_model(cfg.name, pretrained=False, num_classes=num_classes,
                                  drop_rate=cfg.drop_rate)
    except RuntimeError as e:  # timm: "Unknown model (...)"
        raise ValueError(f"model.name: {e}") from None
    if cfg.weights:
        state = load_state_dict_file(cfg.weights)
        own = model.state_dict()
        # Keep matching tensors only: an ImageNet head (1000 classes) is replaced by ours.
        kept = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        if not kept:
            raise ValueError(f"model.weights: no tensor in {cfg.weights} matches timm model {cfg.name!r}")
        model.load_state_dict(kept, strict=False)
    return model
