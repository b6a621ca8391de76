"""Data layer: image reading, dataset layouts, the sample index, settings, torch datasets and
the embedded synthetic dataset. Pure python / numpy / pandas / PIL / torch (no Kedro, no MLflow).
"""

from .images import IMAGE_EXTENSIONS, ImageReadError, image_size, load_image, load_mask, read_mask_values
from .index import INDEX_COLUMNS, DatasetValidationError, empty_index, index_fingerprint, validate_index
from .layouts import LAYOUTS, detect_layout, scan_dataset
from .settings import SETTINGS, iter_groups, make_split
from .synthetic import SYNTHETIC_CLASSES, SYNTHETIC_DEFECTS, ensure_synthetic_dataset, render_sample
from .torch_data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AnomalyImageDataset,
    InfiniteLoader,
    SeededAugment,
    denormalize,
    make_loader,
    resize_and_crop,
)

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
