"""uad.metrics.plots: figures render to non-empty PNGs without touching pyplot state."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from matplotlib.figure import Figure

from uad.metrics import compute_metrics
from uad.metrics.plots import (
    anomaly_overlay_grid,
    figure_to_png_bytes,
    per_class_bar_chart,
    roc_pr_curves,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    n, size = 12, 32
    labels = np.arange(n) % 2
    classes = np.repeat(["a", "b"], n // 2)
    masks = np.zeros((n, size, size), bool)
    for i in np.flatnonzero(labels):
        y, x = rng.integers(0, size - 8, 2)
        masks[i, y : y + 6, x : x + 5] = True
    maps = (rng.random(masks.shape) + masks * 0.8).astype(np.float32)
    scores = maps.reshape(n, -1).max(1)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return labels, scores, masks, maps, classes, images


def _check_png(fig, min_bytes=2_000):
    assert isinstance(fig, Figure)
    png = figure_to_png_bytes(fig)
    assert png.startswith(PNG_SIGNATURE)
    assert min_bytes < len(png) < 5_000_000
    return png


def _pyplot_figures():
    plt = sys.modules.get("matplotlib.pyplot")
    return [] if plt is None else plt.get_fignums()


def test_overlay_grid(data):
    labels, scores, masks, maps, classes, images = data
    before = _pyplot_figures()
    fig = anomaly_overlay_grid(images[:3], masks[:3], maps[:3], titles=["x", "y", "z"])
    assert len(fig.axes) >= 9  # 3 rows x 3 columns (+ colorbar)
    _check_png(fig)
    _check_png(anomaly_overlay_grid(images[:1, ..., 0], None, maps[:1]))  # gray, no masks
    assert _pyplot_figures() == before
    with pytest.raises(ValueError, match="maps must be"):
        anomaly_overlay_grid(images[:2], masks[:2], maps[:3])


def test_roc_pr_curves(data):
    labels, scores, masks, maps, classes, _ = data
    fig = roc_pr_curves(labels, scores, masks, maps, classes, max_pixels=2_000)
    assert len(fig.axes) == 4
    _check_png(fig)
    assert len(roc_pr_curves(labels, scores, class_names=classes).axes) == 2  # image level only


def test_per_class_bar_chart(data):
    labels, scores, masks, maps, classes, _ = data
    df = compute_metrics(labels, scores, masks, maps, classes)
    _check_png(per_class_bar_chart(df))
    df_img = compute_metrics(labels, scores, class_names=classes, pixel=False)
    _check_png(per_class_bar_chart(df_img))  # pixel columns all NaN: left out
    with pytest.raises(ValueError, match="no column"):
        per_class_bar_chart(df, metrics=["nope"])
