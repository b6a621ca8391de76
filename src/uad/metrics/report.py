"""The evaluation report a person reads: cases picked at the stored threshold, pictures of them,
and one self-contained HTML page (every picture embedded) that MLflow's artifact viewer shows.

Core library (numpy, PIL, matplotlib): the ``report`` node of the method template calls
:func:`pick_cases`, :func:`case_grid`, :func:`colour_scale_png` and :func:`html_report`.

Cases, per class, at the image threshold the evaluation stored (``score >= threshold`` is
anomalous): the **worst false alarms** (normal images with the highest scores at or above it),
the **worst misses** (defective images with the lowest scores below it), the best **detections**
and a few **normal** images (the lowest scores), so a reader sees both what the model gets
wrong and what right looks like.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any, Callable, Sequence

import numpy as np

__all__ = ["CASE_KINDS", "pick_cases", "map_scale", "case_png", "case_grid", "colour_scale_png", "html_report",
           "run_title", "build_report"]

#: kind -> (label, colour) of the case tiles
CASE_KINDS = {
    "false_alarm": ("worst false alarm", "#c0392b"),
    "miss": ("worst miss", "#d35400"),
    "detection": ("detection", "#1e8449"),
    "normal": ("normal", "#2471a3"),
}
_NONE = {"false_alarm": "no false alarm", "miss": "no defect missed", "detection": "no defect detected",
         "normal": "no normal image"}


def pick_cases(labels: np.ndarray, scores: np.ndarray, class_names: np.ndarray, threshold: float,
               per_kind: int = 2) -> dict[str, dict[str, list[int]]]:
    """``{class: {kind: [indices]}}`` (see the module docstring); a kind with no image is empty."""
    y = np.asarray(labels).astype(int)
    s = np.asarray(scores, dtype=np.float64)
    cls = np.asarray(class_names).astype(str)
    out: dict[str, dict[str, list[int]]] = {}
    for c in sorted(set(cls.tolist())):
        idx = np.flatnonzero(cls == c)
        normal, defect = idx[y[idx] == 0], idx[y[idx] == 1]
        fa = normal[s[normal] >= threshold]
        miss = defect[s[defect] < threshold]
        hit = defect[s[defect] >= threshold]
        out[c] = {
            "false_alarm": fa[np.argsort(-s[fa], kind="stable")][:per_kind].tolist(),
            "miss": miss[np.argsort(s[miss], kind="stable")][:per_kind].tolist(),
            "detection": hit[np.argsort(-s[hit], kind="stable")][:per_kind].tolist(),
            "normal": normal[np.argsort(s[normal], kind="stable")][:per_kind].tolist(),
        }
    return out


def map_scale(maps: np.ndarray, pixel_threshold: float | None) -> tuple[float, float]:
    """One colour scale for every picture of a report: from the maps' 1st percentile to at least
    their 99.9th, wide enough that the pixel threshold sits at or below its middle."""
    sample = np.asarray(maps, dtype=np.float32).ravel()
    if sample.size > 2_000_000:
        sample = sample[:: sample.size // 2_000_000 + 1]
    lo, hi = (float(v) for v in np.quantile(sample, [0.01, 0.999]))
    if pixel_threshold is not None and np.isfinite(pixel_threshold):
        hi = max(hi, 2.0 * float(pixel_threshold) - lo)
    return lo, hi if hi > lo else lo + 1.0


def _edge(region: np.ndarray) -> np.ndarray:
    return region & ~(np.roll(region, 1, 0) & np.roll(region, -1, 0) & np.roll(region, 1, 1) & np.roll(region, -1, 1))


def _blend(image: np.ndarray, amap: np.ndarray, scale: tuple[float, float], pixel_threshold: float | None,
           mask: np.ndarray | None) -> np.ndarray:
    from matplotlib import colormaps

    lo, hi = scale
    level = np.clip((np.asarray(amap, np.float32) - lo) / (hi - lo), 0.0, 1.0)
    heat = colormaps["jet"](level)[..., :3] * 255.0
    alpha = (0.15 + 0.55 * level)[..., None]
    out = ((1 - alpha) * image.astype(np.float32) + alpha * heat).astype(np.uint8)
    if pixel_threshold is not None:
        out[_edge(np.asarray(amap) >= pixel_threshold)] = (255, 255, 255)
    if mask is not None and mask.any():
        out[_edge(mask.astype(bool))] = (0, 255, 0)
    return out


def case_png(image: np.ndarray, amap: np.ndarray, mask: np.ndarray | None, scale: tuple[float, float],
             pixel_threshold: float | None, size: int = 192) -> bytes:
    """One case as a PNG: the image as the model saw it | the map over it (the report's colour
    scale; white: at or above the pixel threshold; green: the ground-truth outline)."""
    from PIL import Image

    left = np.asarray(image, np.uint8)
    right = _blend(left, amap, scale, pixel_threshold, mask)
    pair = np.concatenate([left, np.full((left.shape[0], 3, 3), 255, np.uint8), right], axis=1)
    im = Image.fromarray(pair)
    if left.shape[0] != size:
        im = im.resize((int(round(pair.shape[1] * size / left.shape[0])), size), Image.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def case_grid(cases: dict[str, dict[str, list[int]]], display: Callable[[int], np.ndarray], maps: np.ndarray,
              masks: np.ndarray, scores: np.ndarray, threshold: float, pixel_threshold: float | None, title: str,
              scale: tuple[float, float] | None = None):
    """A matplotlib figure: one row per class, one column per case kind (its worst instance),
    each cell the image with the map over it; the colour bar marks the pixel threshold."""
    from matplotlib.colors import Normalize

    from uad.metrics.plots import _new_figure

    kinds = list(CASE_KINDS)
    classes = list(cases)
    scale = scale or map_scale(maps, pixel_threshold)
    fig = _new_figure(2.3 * len(kinds) + 1.2, 2.35 * len(classes) + 0.9)
    axes = fig.subplots(len(classes), len(kinds), squeeze=False)
    for r, c in enumerate(classes):
        for k, kind in enumerate(kinds):
            ax = axes[r, k]
            ax.set_xticks([])
            ax.set_yticks([])
            idx = cases[c][kind]
            label, colour = CASE_KINDS[kind]
            if not idx:
                ax.text(0.5, 0.5, _NONE[kind], ha="center", va="center", fontsize=8, color="grey")
                for side in ax.spines.values():
                    side.set_visible(False)
            else:
                i = idx[0]
                ax.imshow(_blend(display(i), maps[i], scale, pixel_threshold, masks[i]))
                ax.set_title(f"{label}\nscore {scores[i]:.4g}", fontsize=7, color=colour)
                for side in ax.spines.values():
                    side.set_edgecolor(colour)
                    side.set_linewidth(2)
            if k == 0:
                ax.set_ylabel(c, fontsize=9)
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable

    sm = ScalarMappable(norm=Normalize(*scale), cmap=colormaps["jet"])
    label = "anomaly map" + ("" if pixel_threshold is None else f" (dashed: pixel threshold {pixel_threshold:.4g})")
    bar = fig.colorbar(sm, ax=axes, shrink=0.6, pad=0.02, label=label)
    if pixel_threshold is not None:
        bar.ax.axhline(pixel_threshold, color="white", lw=2)
        bar.ax.axhline(pixel_threshold, color="black", lw=0.8, ls="--")
    fig.suptitle(f"{title}\nimage threshold {threshold:.4g}: white outline = map at or above the pixel threshold, "
                 f"green = ground truth", fontsize=9)
    return fig


def colour_scale_png(scale: tuple[float, float], pixel_threshold: float | None, width: float = 6.0) -> bytes:
    """The report's colour scale as a horizontal bar with the pixel threshold marked."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    from uad.metrics.plots import _new_figure, figure_to_png_bytes

    fig = _new_figure(width, 0.9)
    ax = fig.subplots()
    sm = ScalarMappable(norm=Normalize(*scale), cmap=colormaps["jet"])
    bar = fig.colorbar(sm, cax=ax, orientation="horizontal")
    bar.set_label("anomaly map value", fontsize=8)
    ax.tick_params(labelsize=7)
    if pixel_threshold is not None:
        ax.axvline(pixel_threshold, color="white", lw=3)
        ax.axvline(pixel_threshold, color="black", lw=1, ls="--")
        ax.text(pixel_threshold, 1.15, f"pixel threshold {pixel_threshold:.4g}", transform=ax.get_xaxis_transform(),
                ha="center", fontsize=7)
    return figure_to_png_bytes(fig)


def _img(png: bytes, alt: str, width: int | None = None) -> str:
    w = f' width="{width}"' if width else ""
    return f'<img alt="{html.escape(alt)}"{w} src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def html_report(title: str, facts: Sequence[tuple[str, str]], table: Any, figures: Sequence[tuple[str, bytes]],
                cases: dict[str, dict[str, list[int]]], case_pngs: dict[int, bytes], captions: dict[int, str],
                scale_png: bytes, notes: Sequence[str] = ()) -> str:
    """One self-contained HTML page (no external file: every picture is embedded): the title,
    the run's facts, the per-class metrics table, the figures, and per class the cases."""
    rows = []
    cols = [c for c in table.columns]
    rows.append("<tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in cols) + "</tr>")
    for _, r in table.iterrows():
        cells = []
        for c in cols:
            v = r[c]
            if isinstance(v, (float, np.floating)):
                cells.append(f"<td>{'-' if not np.isfinite(v) else f'{float(v):.3f}'}</td>")
            else:
                cells.append(f"<td class='name'>{html.escape(str(v))}</td>")
        cls = " class='mean'" if str(r[cols[0]]) == "mean" else ""
        rows.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;"
        "max-width:1400px}h1{font-size:22px;margin-bottom:4px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}"
        "h3{font-size:15px;margin:18px 0 6px}table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td.name{text-align:left}"
        "tr.mean td{font-weight:600;background:#f3f6fa}.facts td{border:none;text-align:left;padding:1px 10px 1px 0}"
        ".cases{display:flex;flex-wrap:wrap;gap:10px}.case{border:3px solid #ccc;padding:4px;font-size:11px;"
        "max-width:400px}.case p{margin:3px 0 0 0;word-break:break-all}.note{color:#555;font-size:13px}</style>",
        "</head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<table class='facts'>" + "".join(f"<tr><td><b>{html.escape(k)}</b></td><td>{html.escape(v)}</td></tr>"
                                           for k, v in facts) + "</table>",
        *(f"<p class='note'>{html.escape(n)}</p>" for n in notes),
        "<h2>Metrics per class</h2>",
        "<table>" + "".join(rows) + "</table>",
    ]
    for name, png in figures:
        parts += [f"<h2>{html.escape(name)}</h2>", _img(png, name, 1100)]
    parts += ["<h2>Cases at the stored threshold</h2>",
              "<p class='note'>Left: the image as the model saw it; right: the anomaly map over it on the colour "
              "scale below (white outline: at or above the pixel threshold; green outline: ground truth).</p>",
              _img(scale_png, "colour scale", 600)]
    for c, kinds in cases.items():
        parts.append(f"<h3>{html.escape(c)}</h3><div class='cases'>")
        for kind, idx in kinds.items():
            label, colour = CASE_KINDS[kind]
            for i in idx:
                parts.append(f"<div class='case' style='border-color:{colour}'>{_img(case_pngs[i], label)}"
                             f"<p><b style='color:{colour}'>{html.escape(label)}</b> {html.escape(captions[i])}</p></div>")
        if not any(kinds.values()):
            parts.append("<p class='note'>no test image</p>")
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


# ------------------------------------------------------------------------------ the run's report
def run_title(method_name: str, data: dict | None, run_id: str = "") -> tuple[str, list[tuple[str, str]]]:
    """``<method> · <dataset> · <setting> · run <id>`` and the facts the report lists."""
    from uad.data.sources import dataset_name

    data = data or {}
    dataset = dataset_name(data).replace("+", ", ")
    setting = str(data.get("setting", "multi_class"))
    title = " · ".join([method_name, dataset, setting] + ([f"run {run_id[:8]}"] if run_id else []))
    facts = [("method", method_name), ("dataset", dataset), ("setting", setting)]
    if run_id:
        facts.append(("MLflow run", run_id))
    return title, facts


def build_report(method_name: str, predictions: dict[str, np.ndarray], metrics_table: Any, reporting: dict,
                 thresholds: dict | None = None, data: dict | None = None,
                 run_id: str = "") -> tuple[bytes, bytes, bytes, str]:
    """The evaluation's pictures and page: the cases at the stored threshold per class (worst
    false alarm, worst miss, a detection, a normal image; :mod:`uad.metrics.report`), ROC / PR
    curves computed exactly as the metrics table, the per-class chart, and one self-contained
    HTML page with all of it and the per-class table; every title names method, dataset,
    setting and run."""
    from .plots import figure_to_png_bytes, per_class_bar_chart, roc_pr_curves

    title, facts = run_title(method_name, data, run_id)
    thresholds = thresholds or {}
    per_kind = int(reporting.get("overlays_per_class", 2))
    labels, scores = predictions["labels"], predictions["scores"]
    classes = predictions["class_names"]
    thr = float(thresholds["image"]) if thresholds.get("image") is not None else float(np.median(scores))
    px = float(thresholds["pixel"]) if thresholds.get("pixel") is not None else None
    crop = predictions["maps"].shape[-1]
    resize = int(predictions["input_resize"]) if "input_resize" in predictions else crop
    cache: dict[int, np.ndarray] = {}

    def display(i: int) -> np.ndarray:
        if i not in cache:
            cache[i] = _display_image(predictions["image_paths"][i], resize, crop)
        return cache[i]

    cases = pick_cases(labels, scores, classes, thr, per_kind=max(1, per_kind))
    maps = predictions["maps"]
    masks = predictions["masks"].astype(bool)
    scale = map_scale(maps, px)
    overlay = case_grid(cases, display, maps, masks, scores, thr, px, title, scale)
    curves = roc_pr_curves(labels, scores, masks, maps, classes, title=title)
    table = metrics_table.set_index("class_name")
    bars = per_class_bar_chart(table, title=title)
    overlay_png, curves_png, bars_png = figure_to_png_bytes(overlay), figure_to_png_bytes(curves), figure_to_png_bytes(bars)
    pngs, captions = {}, {}
    for kinds in cases.values():
        for idx in kinds.values():
            for i in idx:
                if i not in pngs:
                    pngs[i] = case_png(display(i), maps[i].astype(np.float32), masks[i], scale, px)
                    captions[i] = (f"score {float(scores[i]):.4g} · {predictions['defect_types'][i]} · "
                                   f"{_short_path(predictions['image_paths'][i])}")
    facts += [("image threshold", f"{thr:.6g} ({thresholds.get('image_source', 'median of the scores: none stored')})"),
              ("pixel threshold", f"{px:.6g} ({thresholds.get('pixel_source', '')})" if px is not None else "none"),
              ("test images", f"{len(scores)} ({int(np.sum(labels))} defective)")]
    notes = ["Metrics: the papers' protocol (resize, centre crop). Curves: every pixel, as the table."]
    full = thresholds.get("full") if isinstance(thresholds.get("full"), dict) else None
    if full and full.get("image") is not None:
        notes.append(f"infer scores the whole frame; its thresholds, set on the test split scored that way: image "
                     f"{float(full['image']):.6g}" + (f", pixel {float(full['pixel']):.6g}" if full.get("pixel") is not None else ""))
    page = html_report(title, facts, metrics_table, [("Cases per class", overlay_png), ("ROC and PR curves", curves_png),
                                                     ("Metrics per class", bars_png)],
                       cases, pngs, captions, colour_scale_png(scale, px), notes)
    return overlay_png, curves_png, bars_png, page


def _short_path(path: str, keep: int = 3) -> str:
    parts = str(path).replace("\\", "/").split("/")
    return "/".join(parts[-keep:])


def _display_image(path: str, resize: int, crop: int) -> np.ndarray:
    """The test image as the model saw it (square resize, then centre crop) for overlays."""
    from PIL import Image

    from uad.data.images import load_image

    img = np.asarray(Image.fromarray(load_image(path)).resize((resize, resize), Image.BILINEAR))
    top = (resize - crop) // 2
    return img[top:top + crop, top:top + crop]
