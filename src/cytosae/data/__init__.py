"""Data in: manifests from folder trees or CSVs, robust decoding, preprocessing, a synthetic sample."""
from .images import (DEFAULT_MAX_ASPECT, DEFAULT_MAX_PIXELS, IMAGENET_MEAN, IMAGENET_STD, ImageDataset, ImageDecodeError, Preprocess, collate_skipping, open_rgb)
from .manifest import load_manifest

__all__ = ["DEFAULT_MAX_ASPECT", "DEFAULT_MAX_PIXELS", "IMAGENET_MEAN", "IMAGENET_STD", "ImageDataset", "ImageDecodeError", "Preprocess", "collate_skipping",
           "load_manifest", "open_rgb"]
