"""The HTML report in a real browser, read back as a person sees it: headless Chromium opens the
page with no network (benchmarks/report_screenshot.sh) and what it shows is read from its DOM.

* every picture on the page decoded (natural size > 0, it draws on a canvas) and drawn as the
  embedded PNG (its size, mean colour and opacity: a truncated PNG is drawn only in part), and shown;
* the metrics table on the page holds the values of the table the page was made from (the
  pipeline's ``metrics_per_class.csv``; here the table the test hands to ``html_report``);
* the title (the tab's and the heading's) names the method and the dataset.

Broken pages (the PNGs replaced by invalid base64, or by a truncated PNG; a table or a title
other than the run's) are checked the same way and must be caught, so the check is seen to fail.

Without Chromium these tests skip on a workstation and fail under ``CI=true`` (conftest's
``chromium`` fixture; .ci/run installs Debian's chromium)."""

from __future__ import annotations

import html
import io
import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "report_screenshot.sh"
METHOD, DATASET, SETTING = "patchcore", "synthetic", "multi_class"

# Appended to the page before </body>: on the load event (every picture has loaded or failed by
# then) it writes what the browser shows into the DOM, which Chromium then dumps: per picture its
# natural size, whether it decodes, and its pixels as drawn (mean colour, least opacity).
PROBE = """<script>
window.addEventListener('load', () => {  // synchronous: Chromium dumps the DOM once the load handlers return
  const images = [];
  for (const img of document.images) {
    const seen = {alt: img.alt, complete: img.complete, width: img.naturalWidth, height: img.naturalHeight,
                  shown: img.getBoundingClientRect().width, decoded: 'yes'};
    try {  // the pixels as drawn (decoded now if not yet): mean colour, least opacity
      const canvas = document.createElement('canvas');
      canvas.width = img.naturalWidth;
      canvas.height = img.naturalHeight;
      const ctx = canvas.getContext('2d');
      ctx.drawImage(img, 0, 0);  // throws for a picture in the 'broken' state
      const px = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
      let r = 0, g = 0, b = 0, alpha = 255;
      for (let k = 0; k < px.length; k += 4) {
        r += px[k]; g += px[k + 1]; b += px[k + 2]; alpha = Math.min(alpha, px[k + 3]);
      }
      const n = px.length / 4;
      seen.mean = [r / n, g / n, b / n];
      seen.min_alpha = alpha;
    } catch (e) {
      seen.decoded = String(e);
    }
    images.push(seen);
  }
  const heading = [...document.querySelectorAll('h2')].find(
    h => h.innerText.trim() === 'Metrics per class' && h.nextElementSibling && h.nextElementSibling.tagName === 'TABLE');
  const seen = {
    title: document.title,
    h1: [...document.querySelectorAll('h1')].map(h => h.innerText),
    images: images,
    metrics: heading ? [...heading.nextElementSibling.rows].map(r => [...r.cells].map(c => c.innerText.trim()))
                     : null,
  };
  const out = document.createElement('pre');
  out.id = 'uad-probe';
  out.textContent = JSON.stringify(seen);
  document.body.appendChild(out);
});
</script>"""


@pytest.fixture(scope="module")
def report_inputs():
    """What the pipeline's report node hands to ``html_report``: a per-class metrics table,
    figures, cases with their pictures, the colour scale."""
    import pandas as pd

    from uad.metrics import compute_metrics
    from uad.metrics.plots import figure_to_png_bytes, roc_pr_curves
    from uad.metrics.report import case_png, colour_scale_png, map_scale, pick_cases

    rng = np.random.default_rng(0)
    n = 16
    labels, classes = np.arange(n) % 2, np.repeat(["gear", "plate"], n // 2)
    masks = np.zeros((n, 48, 48), bool)
    masks[labels == 1, 10:20, 10:20] = True
    maps = (rng.random(masks.shape) + 0.25 * masks).astype(np.float32)  # imperfect: metrics other than 1
    scores = maps.reshape(n, -1).max(1)
    images = rng.integers(0, 255, (n, 48, 48, 3), dtype=np.uint8)
    cases = pick_cases(labels, scores, classes, float(np.median(scores)))
    scale = map_scale(maps, 1.0)
    pngs = {i: case_png(images[i], maps[i], masks[i], scale, 1.0)
            for kinds in cases.values() for idx in kinds.values() for i in idx}
    table = compute_metrics(labels, scores, masks, maps, classes).reset_index()
    # the pipeline's report reads the table back from metrics_per_class.csv
    buf = io.StringIO()
    table.to_csv(buf, index=False)
    table = pd.read_csv(io.StringIO(buf.getvalue()))
    values = table.select_dtypes("number").to_numpy()
    assert len(np.unique(values.round(3))) > 3, "a table of all-equal values would check nothing"
    figures = [("ROC and PR curves", figure_to_png_bytes(roc_pr_curves(labels, scores, masks, maps, classes)))]
    return {"table": table, "figures": figures, "cases": cases, "pngs": pngs,
            "captions": {i: f"score {scores[i]:.4g}" for i in pngs}, "scale": colour_scale_png(scale, 1.0)}


def _page(inputs, title: str | None = None, table=None) -> str:
    from uad.metrics.report import html_report

    title = title or " · ".join([METHOD, DATASET, SETTING])
    return html_report(title, [("method", METHOD), ("dataset", DATASET), ("setting", SETTING)],
                       inputs["table"] if table is None else table, inputs["figures"], inputs["cases"],
                       inputs["pngs"], inputs["captions"], inputs["scale"])


def _embedded(inputs) -> list[dict]:
    """Every picture the page embeds (figures, colour scale, cases): size, mean colour, least opacity."""
    pngs = [png for _, png in inputs["figures"]] + [inputs["scale"]]
    pngs += [inputs["pngs"][i] for kinds in inputs["cases"].values() for idx in kinds.values() for i in idx]
    out = []
    for png in pngs:
        rgba = np.asarray(Image.open(io.BytesIO(png)).convert("RGBA"), dtype=np.float64)
        out.append({"size": (rgba.shape[1], rgba.shape[0]), "mean": rgba[..., :3].reshape(-1, 3).mean(0),
                    "min_alpha": int(rgba[..., 3].min())})
    return out


def _what_chromium_shows(chromium: str, page: str, tmp_path: Path) -> dict:
    """Open ``page`` in headless Chromium and read back what it shows (see PROBE)."""
    assert page.count("</body>") == 1
    page_file = tmp_path / "report.html"
    page_file.write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    out = subprocess.run([str(SCRIPT), "--dom", str(page_file)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "CHROMIUM": chromium})
    assert out.returncode == 0, out.stderr[-3000:]
    found = re.search(r'<pre id="uad-probe">(.*?)</pre>', out.stdout, re.S)
    assert found, f"the page's load handler did not run before Chromium's DOM dump: {out.stdout[-1500:]}"
    return json.loads(html.unescape(found.group(1)))


def _check_shown(seen: dict, inputs, table) -> None:
    """What a person sees is the report of this run: see the module docstring."""
    # every picture decoded, and drawn as the embedded PNG (size, mean colour within 2 of 255, opacity):
    # a truncated PNG still has a size, but is drawn transparent below the cut
    broken = [f"{im['alt']!r} ({im['width']} x {im['height']}, decode: {im['decoded']})" for im in seen["images"]
              if not (im["complete"] and im["width"] > 0 and im["height"] > 0 and im["decoded"] == "yes")]
    assert not broken, f"{len(broken)} of {len(seen['images'])} pictures did not decode in the browser: {broken}"
    left, other = _embedded(inputs), []
    for im in seen["images"]:
        match = next((e for e in left if e["size"] == (im["width"], im["height"]) and e["min_alpha"] == im["min_alpha"]
                      and np.abs(e["mean"] - np.asarray(im["mean"])).max() <= 2.0), None)
        if match is None:
            other.append(f"{im['alt']!r} ({im['width']} x {im['height']}, mean colour {np.round(im['mean'], 1)}, "
                         f"least opacity {im['min_alpha']})")
        else:
            left.remove(match)
    assert not other, f"pictures drawn other than any embedded PNG (partly drawn, other pixels): {other}"
    assert not left, f"{len(left)} embedded pictures not shown"
    assert all(im["shown"] > 0 for im in seen["images"]), "a picture takes no room on the page"
    # the metrics table as shown equals the table of the run: header, class names, values to the 3 decimals shown
    shown = seen["metrics"]
    assert shown, "no 'Metrics per class' table on the page"
    assert shown[0] == [str(c) for c in table.columns], f"metrics table header {shown[0]}"
    assert len(shown) - 1 == len(table), f"metrics table has {len(shown) - 1} rows, the run's {len(table)}"
    for row, (_, want) in zip(shown[1:], table.iterrows()):
        for cell, col in zip(row, table.columns):
            v = want[col]
            if isinstance(v, (float, np.floating)):
                ok = cell == "-" if not np.isfinite(v) else abs(float(cell) - float(v)) <= 5e-4 + 1e-9
            else:
                ok = cell == str(v)
            assert ok, f"metrics table: {want[table.columns[0]]} / {col} shows {cell!r}, the run's value is {v!r}"
    # the title names the method and the dataset: the browser tab's and the heading's
    for where, text in (("tab title", seen["title"]), ("heading", " ".join(seen["h1"]))):
        assert METHOD in text and DATASET in text, f"the {where} {text!r} does not name {METHOD} and {DATASET}"


def _invalid_base64(page: str) -> str:
    return re.sub(r"(data:image/png;base64,)[^\"']+", r"\1!!not*base64!!", page)


def _truncated_png(page: str) -> str:
    return re.sub(r"(data:image/png;base64,)([^\"']+)", lambda m: m.group(1) + m.group(2)[:len(m.group(2)) // 8 * 4],
                  page)


def _other_table(inputs):
    table = inputs["table"].copy()
    col = table.columns[1]
    table.loc[0, col] = table.loc[0, col] - 0.05  # one value off by more than the 3 decimals shown
    return table


# case -> how the page is spoilt, and the check that must catch it (None: the intact page passes)
CASES = {
    "intact": (lambda inputs: _page(inputs), None),
    "png-replaced-by-invalid-base64": (lambda inputs: _invalid_base64(_page(inputs)), "did not decode in the browser"),
    "png-truncated": (lambda inputs: _truncated_png(_page(inputs)), "pictures drawn other than any embedded PNG"),
    "table-not-the-runs": (lambda inputs: _page(inputs, table=_other_table(inputs)), "metrics table: gear / "),
    "title-without-dataset": (lambda inputs: _page(inputs, title=f"{METHOD} · {SETTING}"), "does not name"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_report_page_shows_the_runs_pictures_table_and_title(case, chromium, report_inputs, tmp_path):
    make, caught_by = CASES[case]
    seen = _what_chromium_shows(chromium, make(report_inputs), tmp_path)
    assert len(seen["images"]) == len(_embedded(report_inputs))
    if caught_by is None:
        _check_shown(seen, report_inputs, report_inputs["table"])
    else:
        with pytest.raises(AssertionError, match=re.escape(caught_by)):
            _check_shown(seen, report_inputs, report_inputs["table"])


def test_report_page_screenshot_in_headless_chromium(chromium, report_inputs, tmp_path):
    """benchmarks/report_screenshot.sh takes a screenshot of the page: a rendered page with the
    dark title text at the top, not a blank or error screen."""
    html_file = tmp_path / "report.html"
    html_file.write_text(_page(report_inputs), encoding="utf-8")
    shot = tmp_path / "shot.png"
    out = subprocess.run([str(SCRIPT), str(html_file), str(shot), "1000", "900"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "CHROMIUM": chromium})
    assert out.returncode == 0, out.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (900, 1000)
    assert img.std() > 20  # a rendered page (text, table, pictures), not a blank or error screen
    assert (img[:60].min(axis=(0, 1)) < 80).all()  # the dark title text at the top
