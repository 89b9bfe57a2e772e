"""ioisray: Ray-based training for imbalanced medical image classification.

The commands as functions (imported on first use, so that `import ioisray` stays light):
`ioisray.load_config`, `ioisray.train`, `ioisray.evaluate`, `ioisray.predict` (see ioisray/api.py)."""

__version__ = "0.1.0"
__all__ = ["load_config", "train", "evaluate", "predict"]


def __getattr__(name: str):
    if name in __all__:
        from ioisray import api

        return getattr(api, name)
    raise AttributeError(f"module 'ioisray' has no attribute {name!r}")
