"""Models: the classifier (timm) and the diffusion UNet (diffusers). Names load on first use, so that
importing `ioisray.models.diffusion` or `ioisray.models.wrapping` does not import timm (a diffusion
pretraining worker has no classifier)."""
import importlib

_FROM = {"NormedLinear": "classifier", "build_classifier": "classifier", "create_classifier": "classifier",
         "load_state_dict_file": "classifier", "cpu_state_dict": "wrapping", "unwrap": "wrapping"}

__all__ = sorted(_FROM)


def __getattr__(name: str):
    if name not in _FROM:
        raise AttributeError(f"module 'ioisray.models' has no attribute {name!r}")
    return getattr(importlib.import_module(f"ioisray.models.{_FROM[name]}"), name)
