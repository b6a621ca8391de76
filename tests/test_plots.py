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


def test_curve_legends_equal_the_metrics_table(data):
    """The curves are computed as the table is (every pixel, float32): each legend value is the
    table's value, image and pixel level."""
    labels, scores, masks, maps, classes, _ = data
    table = compute_metrics(labels, scores, masks, maps, classes)
    fig = roc_pr_curves(labels, scores, masks, maps, classes, title="m · d · s")
    pixel_roc = {t.split(" (")[0]: float(t.split("(")[1].rstrip(")")) for t in
                 [line.get_label() for line in fig.axes[2].get_lines() if not line.get_label().startswith("_")]}
    pixel_ap = {t.split(" (")[0]: float(t.split("(")[1].rstrip(")")) for t in
                [line.get_label() for line in fig.axes[3].get_lines() if not line.get_label().startswith("_")]}
    for c in ("a", "b"):
        assert pixel_roc[c] == pytest.approx(table.loc[c, "pixel_auroc"], abs=5e-4)
        assert pixel_ap[c] == pytest.approx(table.loc[c, "pixel_ap"], abs=5e-4)
    assert fig.axes[2].get_title() == "pixel ROC (AUROC)" and fig._suptitle.get_text() == "m · d · s"


def test_report_cases_and_page(data):
    """Cases at the threshold are the right images in the right order; the page is one
    self-contained file (every picture embedded, nothing fetched) with the table and the cases."""
    import pandas as pd

    from uad.metrics.report import case_grid, case_png, colour_scale_png, html_report, map_scale, pick_cases

    labels, scores, masks, maps, classes, images = data
    thr = float(np.median(scores))
    cases = pick_cases(labels, scores, classes, thr, per_kind=2)
    for c, kinds in cases.items():
        for i in kinds["false_alarm"]:
            assert classes[i] == c and labels[i] == 0 and scores[i] >= thr
        for i in kinds["miss"]:
            assert classes[i] == c and labels[i] == 1 and scores[i] < thr
        fa = kinds["false_alarm"]
        assert all(scores[a] >= scores[b] for a, b in zip(fa, fa[1:]))  # worst first
        normal_c = np.flatnonzero((classes == c) & (labels == 0) & (scores >= thr))
        if len(normal_c):
            assert fa[0] == normal_c[np.argmax(scores[normal_c])]
    scale = map_scale(maps, 1.2)
    assert scale[0] < 1.2 <= (scale[0] + scale[1]) / 2 + 1e-6
    fig = case_grid(cases, lambda i: images[i], maps, masks, scores, thr, 1.2, "m · d · s", scale)
    _check_png(fig)
    pngs = {i: case_png(images[i], maps[i], masks[i], scale, 1.2) for k in cases.values() for v in k.values() for i in v}
    table = compute_metrics(labels, scores, masks, maps, classes).reset_index()
    page = html_report("m · d · s", [("method", "m")], table, [("curves", figure_to_png_bytes(fig))], cases, pngs,
                       {i: f"score {scores[i]:.3g}" for i in pngs}, colour_scale_png(scale, 1.2), ["a note"])
    assert page.startswith("<!doctype html>") and "<title>m · d · s</title>" in page
    assert "http://" not in page and "https://" not in page and page.count("data:image/png;base64,") == len(pngs) + 2
    from uad.metrics.report import CASE_KINDS

    shown = {kind for kinds in cases.values() for kind, idx in kinds.items() if idx}
    assert shown and all(f">{CASE_KINDS[k][0]}</b>" in page for k in shown)
    assert f"{table.iloc[-1]['image_auroc']:.3f}" in page


def test_per_class_chart_keeps_its_legend_inside_the_picture(data):
    labels, scores, masks, maps, classes, _ = data
    df = compute_metrics(labels, scores, masks, maps, classes)
    fig = per_class_bar_chart(df, title="m · d · s")
    figure_to_png_bytes(fig)  # lays the figure out
    legend = fig.axes[0].get_legend().get_window_extent()
    box = fig.bbox
    assert legend.x0 >= box.x0 and legend.x1 <= box.x1 and legend.y0 >= box.y0 and legend.y1 <= box.y1
