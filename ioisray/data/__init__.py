"""Dataset loading (several on-disk layouts) and leakage-free splitting."""
from .base import DataError, ImageDataset, decode_image
from .loaders import (APTOS_CLASSES, HAM_CLASSES, LOADERS, load_aptos, load_csv, load_dataset,
                      load_dermamnist, load_digits_lt, load_ham10000, load_imagefolder)
from .splits import split_dataset

__all__ = [
    "DataError", "ImageDataset", "decode_image", "LOADERS", "load_dataset", "split_dataset",
    "HAM_CLASSES", "APTOS_CLASSES", "load_digits_lt", "load_ham10000", "load_aptos",
    "load_dermamnist", "load_imagefolder", "load_csv",
]
