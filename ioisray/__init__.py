"""ioisray: Ray-based training for imbalanced medical image classification."""

__version__ = "0.1.0"
