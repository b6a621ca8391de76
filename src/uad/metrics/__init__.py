"""Evaluation core: exact image/pixel metrics (AUROC, AP, F1-max, AUPRO) and plots.

Pure numpy / torch (pandas for the table, matplotlib for :mod:`uad.metrics.plots`); never
imports kedro or mlflow. See :mod:`uad.metrics.metrics` for definitions and the exactness and
memory notes.
"""

from uad.metrics.metrics import (
    DEFAULT_FPR_LIMIT,
    IMAGE_METRIC_NAMES,
    METRIC_NAMES,
    PIXEL_METRIC_NAMES,
    aupro,
    auroc,
    average_precision,
    binary_clf_curve,
    compute_metrics,
    f1_max,
    image_metrics,
    label_regions,
    pixel_metrics,
    pr_curve,
    pro_curve,
    roc_curve,
)

__all__ = [
    "DEFAULT_FPR_LIMIT",
    "IMAGE_METRIC_NAMES",
    "METRIC_NAMES",
    "PIXEL_METRIC_NAMES",
    "aupro",
    "auroc",
    "average_precision",
    "binary_clf_curve",
    "compute_metrics",
    "f1_max",
    "image_metrics",
    "label_regions",
    "pixel_metrics",
    "pr_curve",
    "pro_curve",
    "roc_curve",
]
