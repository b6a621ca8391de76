"""Evaluation figures: anomaly-map overlays, ROC / PR curves, per-class metric bars.

Every function builds a :class:`matplotlib.figure.Figure` with its own Agg canvas: nothing goes
through ``matplotlib.pyplot``, so no global figure state is created or leaked and no display
backend is needed (safe in Kedro nodes, tests and worker processes). Turn a figure into PNG
bytes with :func:`figure_to_png_bytes` (what MLflow / the catalog store).
"""

from __future__ import annotations

import io
from typing import Any, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from uad.metrics.metrics import METRIC_NAMES, auroc, average_precision, pr_curve, roc_curve

__all__ = ["anomaly_overlay_grid", "benchmark_heatmap", "image_overlay_png", "roc_pr_curves", "per_class_bar_chart",
           "figure_to_png_bytes"]


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas
    return fig


def figure_to_png_bytes(fig: Figure, dpi: int = 100) -> bytes:
    """Render ``fig`` with Agg and return the PNG file content."""
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def anomaly_overlay_grid(
    images: Any,
    masks: Any,
    maps: Any,
    titles: Sequence[str] | None = None,
    *,
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = "jet",
    alpha: float = 0.5,
    cell_size: float = 2.4,
) -> Figure:
    """One row per sample: image | ground truth (red fill + contour) | anomaly-map heat overlay.

    Args:
        images: (N, H, W, 3) uint8 (``(N, H, W)`` gray is accepted).
        masks: (N, H, W) binary ground truth, or ``None`` (the middle column then shows only
            the image).
        maps: (N, H, W) anomaly maps at the image size.
        titles: N row titles (e.g. ``"bottle / broken_large / score 0.91"``).
        vmin, vmax: colour range of the maps; default: min and max over all N maps, so rows are
            comparable.
    """
    img = np.asarray(images)
    if img.ndim == 3:
        img = np.repeat(img[..., None], 3, axis=-1)
    if img.ndim != 4 or img.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3), got shape {np.shape(images)}")
    n, h, w, _ = img.shape
    amap = np.asarray(maps, dtype=np.float32)
    if amap.shape != (n, h, w):
        raise ValueError(f"maps must be {(n, h, w)} like the images, got {amap.shape}")
    gt = None if masks is None else np.asarray(masks).astype(bool)
    if gt is not None and gt.shape != (n, h, w):
        raise ValueError(f"masks must be {(n, h, w)} like the images, got {gt.shape}")
    if titles is not None and len(titles) != n:
        raise ValueError(f"titles has {len(titles)} entries for {n} images")
    if n == 0:
        raise ValueError("no images to draw")
    norm = Normalize(
        vmin=float(amap.min()) if vmin is None else vmin,
        vmax=float(amap.max()) if vmax is None else vmax,
    )
    fig = _new_figure(3 * cell_size + 0.8, n * cell_size)
    axes = fig.subplots(n, 3, squeeze=False)
    red = np.zeros((h, w, 4), dtype=np.float32)
    red[..., 0] = 1.0
    heat = None
    for i in range(n):
        a0, a1, a2 = axes[i]
        a0.imshow(img[i])
        a1.imshow(img[i])
        if gt is not None and gt[i].any():
            red[..., 3] = gt[i] * 0.35
            a1.imshow(red)
            a1.contour(gt[i].astype(np.float32), levels=[0.5], colors="red", linewidths=1.0)
        a2.imshow(img[i])
        heat = a2.imshow(amap[i], cmap=cmap, norm=norm, alpha=alpha)
        if titles is not None:
            a0.set_ylabel(str(titles[i]), fontsize=8)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_title("image", fontsize=9)
    axes[0, 1].set_title("ground truth", fontsize=9)
    axes[0, 2].set_title("anomaly map", fontsize=9)
    fig.colorbar(heat, ax=axes[:, 2], shrink=0.8)
    return fig


def _sample_pixels(
    masks: np.ndarray, maps: np.ndarray, idx: np.ndarray, k: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    hw = masks.shape[1] * masks.shape[2]
    total = idx.size * hw
    if total <= k:
        return masks[idx].reshape(-1), maps[idx].reshape(-1)
    flat = rng.integers(0, total, size=k)
    img, pix = idx[flat // hw], flat % hw
    return masks.reshape(masks.shape[0], -1)[img, pix], maps.reshape(maps.shape[0], -1)[img, pix]


def _decimate(x: np.ndarray, y: np.ndarray, n: int = 4000) -> tuple[np.ndarray, np.ndarray]:
    """At most ``n`` points of a curve for drawing (first and last kept): the curve itself is
    computed exactly, only the line drawn is thinned."""
    if x.size <= n:
        return x, y
    keep = np.unique(np.linspace(0, x.size - 1, n).round().astype(np.int64))
    return x[keep], y[keep]


def roc_pr_curves(
    labels: Any,
    scores: Any,
    masks: Any = None,
    maps: Any = None,
    class_names: Any = None,
    *,
    max_pixels: int | None = None,
    seed: int = 0,
    title: str | None = None,
) -> Figure:
    """Image-level ROC and PR curves per class (top row) and pixel-level ones (bottom row).

    Computed exactly as :func:`uad.metrics.compute_metrics` computes the metrics table (every
    pixel of a class, maps cast to float32, the same curve functions), so each legend value
    equals the table's; only the drawn lines are thinned to a few thousand points.
    ``max_pixels`` (default: all) samples pixels instead, for very large test sets; the titles
    then say "sampled". Pass ``masks=None`` / ``maps=None`` for the image row only. A class with
    a single label value has no curve. ``title`` names the run (method, dataset, setting).
    """
    y = np.asarray(labels).astype(int)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.shape != y.shape:
        raise ValueError(f"labels and scores must be (N,), got {y.shape} and {s.shape}")
    n = y.size
    cls = np.full(n, "all") if class_names is None else np.asarray(class_names).astype(str)
    if cls.shape != (n,):
        raise ValueError(f"class_names must be ({n},), got {cls.shape}")
    pixel = masks is not None and maps is not None
    if pixel:
        m = np.asarray(masks)
        a = np.asarray(maps)
        m = m[:, 0] if m.ndim == 4 else m
        a = a[:, 0] if a.ndim == 4 else a
        if a.ndim != 3 or a.shape[0] != n or m.shape != a.shape:
            raise ValueError(f"masks {m.shape} and maps {a.shape} must both be ({n}, H, W)")
    classes = sorted(set(cls.tolist()))
    rng = np.random.default_rng(seed)
    rows = 2 if pixel else 1
    fig = _new_figure(10, 4.2 * rows + (0.4 if title else 0.0))
    axes = fig.subplots(rows, 2, squeeze=False)
    per_class = None if max_pixels is None else max(1, max_pixels // len(classes))
    for c in classes:
        idx = np.flatnonzero(cls == c)
        curves = [(0, y[idx], s[idx])]
        if pixel:
            if per_class is None:
                py, ps = m[idx].reshape(-1).astype(bool), a[idx].reshape(-1).astype(np.float32)
            else:
                py, ps = _sample_pixels(m, a, idx, per_class, rng)
                py, ps = py.astype(bool), ps.astype(np.float32)
            curves.append((1, py, ps))
        for row, yy, ss in curves:
            if yy.min() == yy.max():
                continue
            fpr, tpr, _ = roc_curve(yy, ss)
            prec, rec, _ = pr_curve(yy, ss)
            axes[row, 0].plot(*_decimate(fpr, tpr), lw=1, label=f"{c} ({auroc(yy, ss):.3f})")
            axes[row, 1].plot(*_decimate(rec, prec), lw=1, label=f"{c} ({average_precision(yy, ss):.3f})")
    for row, level in enumerate(["image", "pixel" if per_class is None else "pixel (sampled)"][:rows]):
        ax_roc, ax_pr = axes[row]
        ax_roc.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        ax_roc.set(xlabel="false positive rate", ylabel="true positive rate",
                   title=f"{level} ROC (AUROC)", xlim=(0, 1), ylim=(0, 1.01))
        ax_pr.set(xlabel="recall", ylabel="precision", title=f"{level} PR (AP)",
                  xlim=(0, 1), ylim=(0, 1.01))
        for ax in (ax_roc, ax_pr):
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6, loc="lower right" if ax is ax_roc else "lower left")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def per_class_bar_chart(metrics_df: Any, metrics: Sequence[str] | None = None, title: str | None = None) -> Figure:
    """Grouped bars: one group per row of ``metrics_df`` (classes and ``mean``), one bar per metric.

    ``metrics_df`` is the table of :func:`uad.metrics.compute_metrics`; ``metrics`` defaults to
    the columns of :data:`METRIC_NAMES` that are present and not all NaN. NaN values draw no bar.
    """
    if metrics is None:
        metrics = [c for c in METRIC_NAMES if c in metrics_df.columns
                   and metrics_df[c].notna().any()]
    missing = [c for c in metrics if c not in metrics_df.columns]
    if missing:
        raise ValueError(f"metrics_df has no column(s) {missing}")
    if len(metrics_df) == 0 or not metrics:
        # normal-only test splits (a production line with no defects collected yet): no metric
        # exists; the chart says so instead of failing the report
        fig = _new_figure(6.0, 2.2)
        ax = fig.subplots()
        ax.axis("off")
        ax.text(0.5, 0.5, "No metric to chart: the test split has no anomalous images.\n"
                "The decision thresholds were set at the false-positive rate on its normal images\n"
                "(evaluation.threshold_fpr); add defect images to measure AUROC / AP / AUPRO.",
                ha="center", va="center", fontsize=9, wrap=True)
        return fig
    groups = [str(i) for i in metrics_df.index]
    values = metrics_df[list(metrics)].to_numpy(dtype=np.float64)  # G, M
    g, k = values.shape
    width = 0.8 / k
    fig = _new_figure(float(np.clip(2.8 + 0.12 * g * k, 7.5, 17.5)), 4.4)
    ax = fig.subplots()
    x = np.arange(g)
    for j, name in enumerate(metrics):
        ax.bar(x - 0.4 + width * (j + 0.5), values[:, j], width, label=name)
    ax.set_xticks(x, groups, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score")
    ax.grid(axis="y", lw=0.5, alpha=0.5)
    # the legend in its own column right of the axes: never clipped, never over a bar
    ax.legend(*ax.get_legend_handles_labels(), loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7,
              frameon=False, borderaxespad=0.0)
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def _wrap(draw, text: str, font, width: int) -> list[str]:
    """``text`` cut into lines no wider than ``width`` px (words kept whole where they fit; a
    word longer than a line, a long path say, is cut at characters)."""
    lines: list[str] = []
    for para in text.split("\n"):
        cur = ""
        for word in para.split(" "):
            trial = f"{cur} {word}" if cur else word
            if draw.textlength(trial, font=font) <= width:
                cur = trial
                continue
            if cur:
                lines.append(cur)
            cur = ""
            for ch in word:
                if draw.textlength(cur + ch, font=font) > width and cur:
                    lines.append(cur)
                    cur = ""
                cur += ch
        lines.append(cur)
    return lines


def image_overlay_png(image: np.ndarray, amap: np.ndarray, pixel_threshold: float | None, text: str,
                      anomalous: bool, max_side: int | None = 1024) -> bytes:
    """One inference picture at the image's own size (its longer side capped at ``max_side``,
    aspect kept) as PNG bytes: the anomaly map blended over the image (jet; the colour scale puts
    the pixel threshold at its middle; pixels the model did not score, NaN, stay uncoloured), the
    region at or above the threshold outlined in white, and ``text`` in a banner across the top,
    wrapped to the width (red when ``anomalous``, green otherwise). Without a pixel threshold
    the map's 99th percentile stands in for the outline."""
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    img = np.asarray(image, dtype=np.uint8)
    m = np.asarray(amap, dtype=np.float32)
    h, w = img.shape[:2]
    if m.shape != (h, w):
        raise ValueError(f"map {m.shape} and image {(h, w)} differ in size")
    scale = 1.0 if not max_side or max(h, w) <= int(max_side) else int(max_side) / max(h, w)
    oh, ow = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    if (oh, ow) != (h, w):
        img = np.asarray(Image.fromarray(img).resize((ow, oh), Image.LANCZOS))
        m = np.asarray(Image.fromarray(m, mode="F").resize((ow, oh), Image.BILINEAR))
    valid = np.isfinite(m)
    thr = pixel_threshold if pixel_threshold is not None else (float(np.quantile(m[valid], 0.99)) if valid.any() else 0.0)
    top = 2.0 * thr if thr > 0 else float(np.nanmax(m) if valid.any() else 1.0) or 1.0
    level = np.clip(np.nan_to_num(m, nan=0.0) / top, 0.0, 1.0)
    heat = (colormaps["jet"](level)[..., :3] * 255).astype(np.float32)
    # the heat shows where the map is high: normal regions keep most of their own colour
    alpha = np.where(valid, 0.1 + 0.55 * level, 0.0)[..., None].astype(np.float32)
    blend = ((1.0 - alpha) * img.astype(np.float32) + alpha * heat).astype(np.uint8)
    hot = valid & (np.nan_to_num(m, nan=-np.inf) >= thr)
    edge = hot & ~(np.roll(hot, 1, 0) & np.roll(hot, -1, 0) & np.roll(hot, 1, 1) & np.roll(hot, -1, 1))
    if max(oh, ow) >= 400:  # a 2-px outline on large pictures
        edge = edge | np.roll(edge, 1, 0) | np.roll(edge, 1, 1)
    blend[edge] = (255, 255, 255)
    canvas = Image.fromarray(blend).convert("RGBA")
    band = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(band)
    font = _font(max(8, min(22, ow // 28)))
    pad = max(2, ow // 150)
    lines = _wrap(draw, text, font, max(10, ow - 2 * pad))
    line_h = int(round(font.size * 1.25)) if hasattr(font, "size") else 12
    if (pad * 2 + line_h * len(lines)) > 0.3 * oh and "  " in text:
        # a small picture: the verdict and score first, the rest (method, path) only as far as it
        # fits in a third of the height; the results table names every overlay's input in full
        head, _, rest = text.partition(")")
        lines = _wrap(draw, head + ")", font, max(10, ow - 2 * pad))
        room = max(0, int((0.3 * oh - pad * 2) // line_h) - len(lines))
        tail = _wrap(draw, rest.strip(), font, max(10, ow - 2 * pad))
        lines += tail[:room] if len(tail) <= room else tail[:max(0, room - 1)] + (["..." + tail[-1][-12:]] if room else [])
    band_h = min(oh, pad * 2 + line_h * len(lines))
    colour = (200, 30, 30, 200) if anomalous else (40, 120, 40, 200)
    draw.rectangle((0, 0, ow, band_h), fill=colour)
    for k, line in enumerate(lines):
        draw.text((pad, pad + k * line_h), line, fill=(255, 255, 255, 255), font=font)
    out = Image.alpha_composite(canvas, band).convert("RGB")
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue()


def benchmark_heatmap(long: Any, metrics: Sequence[str] = ("image_auroc", "pixel_auroc", "pixel_aupro"),
                      title: str | None = None) -> Figure:
    """Classes x methods heat maps, one panel per metric, every cell written: the comparison
    table of a benchmark (``long``: columns method, setting, seed, class_name, metric, value;
    seeds averaged, one column per method and setting, the ``mean`` row last)."""
    import pandas as pd

    df = pd.DataFrame(long)
    df = df[df["metric"].isin(metrics)]
    if df.empty:
        fig = _new_figure(6.0, 2.0)
        ax = fig.subplots()
        ax.axis("off")
        ax.text(0.5, 0.5, "No metric to compare (no child run finished, or no anomalous test image).",
                ha="center", va="center", fontsize=9)
        return fig
    df = df.assign(column=[m if s == "multi_class" else f"{m}\n{s}" for m, s in zip(df["method"], df["setting"])])
    shown = [m for m in metrics if m in set(df["metric"])]
    columns = list(dict.fromkeys(df["column"]))
    classes = sorted(c for c in set(df["class_name"]) if c != "mean") + ["mean"]
    width = float(np.clip(1.6 + 0.95 * len(columns), 3.6, 9.0))
    fig = _new_figure(width * len(shown), float(np.clip(1.3 + 0.36 * len(classes), 2.6, 14.0)))
    axes = np.atleast_1d(fig.subplots(1, len(shown)))
    for ax, metric in zip(axes, shown):
        grid = (df[df["metric"] == metric].pivot_table(index="class_name", columns="column", values="value", aggfunc="mean")
                .reindex(index=classes, columns=columns))
        values = grid.to_numpy(dtype=np.float64)
        low = 0.5 if metric.endswith("auroc") else 0.0  # AUROC's chance is 0.5; AP / F1 / AUPRO's lower
        im = ax.imshow(values, cmap="RdYlGn", vmin=low, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(columns)), columns, fontsize=8)
        ax.set_yticks(range(len(classes)), classes, fontsize=8)
        ax.axhline(len(classes) - 1.5, color="black", lw=1.2)  # the mean row below a rule
        for r in range(values.shape[0]):
            for c in range(values.shape[1]):
                v = values[r, c]
                dark = np.isfinite(v) and (v - low) / (1.0 - low) < 0.15 or (v - low) / (1.0 - low) > 0.85
                ax.text(c, r, "-" if not np.isfinite(v) else f"{v:.3f}", ha="center", va="center", fontsize=8,
                        color="white" if dark else "black", fontweight="bold" if r == len(classes) - 1 else "normal")
        ax.set_title(metric + (" (0.5 = chance)" if low == 0.5 else ""), fontsize=10)
        ax.tick_params(length=0)
        fig.colorbar(im, ax=ax, shrink=0.8)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig

