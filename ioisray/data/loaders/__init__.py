"""One small loader per dataset layout, registered by name, and the `load_dataset` factory.

Every loader returns an ImageDataset whose images are decoded by `base.build_dataset`
(PIL, converted to RGB, resized to image_size x image_size; aspect ratio not kept).
"""
from .registry import LOADERS, load_dataset, register
from .rows import IMAGE_EXTENSIONS, read_csv
# Importing the loader modules registers their loaders.
from .medical import APTOS_CLASSES, HAM_CLASSES, load_aptos, load_dermamnist, load_ham10000
from .generic import load_csv, load_digits_lt, load_imagefolder

__all__ = [
    "LOADERS", "load_dataset", "register", "IMAGE_EXTENSIONS", "read_csv", "APTOS_CLASSES", "HAM_CLASSES",
    "load_aptos", "load_dermamnist", "load_ham10000", "load_csv", "load_digits_lt", "load_imagefolder",
]
