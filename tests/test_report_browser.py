"""The HTML report in a real browser: headless Chromium opens the page with no network and takes a
screenshot (benchmarks/report_screenshot.sh). Skipped where Debian's chromium is not installed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")),
                    reason="headless check needs Debian's chromium package (apt-get install chromium)")
def test_report_page_renders_in_headless_chromium(tmp_path):
    from uad.metrics import compute_metrics
    from uad.metrics.plots import figure_to_png_bytes, roc_pr_curves
    from uad.metrics.report import case_png, colour_scale_png, html_report, map_scale, pick_cases

    rng = np.random.default_rng(0)
    n = 8
    labels, classes = np.arange(n) % 2, np.repeat(["gear", "plate"], n // 2)
    masks = np.zeros((n, 48, 48), bool)
    masks[labels == 1, 10:20, 10:20] = True
    maps = (rng.random(masks.shape) + masks).astype(np.float32)
    scores = maps.reshape(n, -1).max(1)
    images = rng.integers(0, 255, (n, 48, 48, 3), dtype=np.uint8)
    cases = pick_cases(labels, scores, classes, float(np.median(scores)))
    scale = map_scale(maps, 1.0)
    pngs = {i: case_png(images[i], maps[i], masks[i], scale, 1.0) for k in cases.values() for v in k.values() for i in v}
    table = compute_metrics(labels, scores, masks, maps, classes).reset_index()
    page = html_report("demo · synthetic · multi_class", [("method", "demo")], table,
                       [("curves", figure_to_png_bytes(roc_pr_curves(labels, scores, masks, maps, classes)))],
                       cases, pngs, {i: "x" for i in pngs}, colour_scale_png(scale, 1.0))
    html_file = tmp_path / "report.html"
    html_file.write_text(page)
    shot = tmp_path / "shot.png"
    out = subprocess.run([str(ROOT / "benchmarks" / "report_screenshot.sh"), str(html_file), str(shot), "1000", "900"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (900, 1000)
    assert img.std() > 20  # a rendered page (text, table, pictures), not a blank or error screen
    assert (img[:60].min(axis=(0, 1)) < 80).all()  # the dark title text at the top
