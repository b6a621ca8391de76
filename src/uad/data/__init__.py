"""Data layer: image reading, dataset layouts, the sample index, settings, torch datasets and
the embedded synthetic dataset. Pure python / numpy / pandas / PIL / torch (no Kedro, no MLflow).

The names below are exported lazily (PEP 562): ``import uad.data.index`` (what ingestion reads)
does not import torch; only the torch datasets do, when first used.
"""

from __future__ import annotations

from uad.exports import lazy_exports

_EXPORTS = {
    ".images": ("IMAGE_EXTENSIONS", "ImageReadError", "image_size", "load_image", "load_mask", "read_mask_values"),
    ".index": ("INDEX_COLUMNS", "DatasetValidationError", "empty_index", "index_fingerprint", "validate_index"),
    ".layouts": ("LAYOUTS", "detect_layout", "scan_dataset"),
    ".settings": ("SETTINGS", "iter_groups", "make_split"),
    ".synthetic": ("SYNTHETIC_CLASSES", "SYNTHETIC_DEFECTS", "ensure_synthetic_dataset", "render_sample"),
    ".torch_data": ("IMAGENET_MEAN", "IMAGENET_STD", "AnomalyImageDataset", "InfiniteLoader", "SeededAugment",
                   "denormalize", "make_loader", "resize_and_crop"),
}

__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
