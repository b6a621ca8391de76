"""Data layer: image reading, dataset layouts, the sample index, settings, torch datasets and
the embedded synthetic dataset. Pure python / numpy / pandas / PIL / torch (no Kedro, no MLflow).

The names below are exported lazily (PEP 562): ``import uad.data.index`` (what ingestion reads)
does not import torch; only the torch datasets do, when first used.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "images": ("IMAGE_EXTENSIONS", "ImageReadError", "image_size", "load_image", "load_mask", "read_mask_values"),
    "index": ("INDEX_COLUMNS", "DatasetValidationError", "empty_index", "index_fingerprint", "validate_index"),
    "layouts": ("LAYOUTS", "detect_layout", "scan_dataset"),
    "settings": ("SETTINGS", "iter_groups", "make_split"),
    "synthetic": ("SYNTHETIC_CLASSES", "SYNTHETIC_DEFECTS", "ensure_synthetic_dataset", "render_sample"),
    "torch_data": ("IMAGENET_MEAN", "IMAGENET_STD", "AnomalyImageDataset", "InfiniteLoader", "SeededAugment",
                   "denormalize", "make_loader", "resize_and_crop"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'uad.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "INDEX_COLUMNS",
    "LAYOUTS",
    "SETTINGS",
    "SYNTHETIC_CLASSES",
    "SYNTHETIC_DEFECTS",
    "AnomalyImageDataset",
    "DatasetValidationError",
    "ImageReadError",
    "InfiniteLoader",
    "SeededAugment",
    "denormalize",
    "detect_layout",
    "empty_index",
    "ensure_synthetic_dataset",
    "image_size",
    "index_fingerprint",
    "iter_groups",
    "load_image",
    "load_mask",
    "make_loader",
    "make_split",
    "read_mask_values",
    "render_sample",
    "resize_and_crop",
    "scan_dataset",
    "validate_index",
]
