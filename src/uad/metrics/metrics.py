"""Exact, vectorised image- and pixel-level anomaly-detection metrics.

Seven numbers per class, as reported by the papers (Dinomaly, INP-Former++, ...), see
:data:`METRIC_NAMES`:

* image level, from one score per image: AUROC, average precision (AP), F1-max;
* pixel level, from one anomaly map per image against its ground-truth mask: AUROC, AP, F1-max
  and AUPRO (area under the per-region-overlap curve up to 30 % FPR, Bergmann et al., "The MVTec
  Anomaly Detection Dataset", IJCV 2021, sec. 5.2 / the official MVTec-AD evaluation code).

Protocol of :func:`compute_metrics`: every metric is computed per class, then the ``mean`` row
averages the classes (the papers' protocol; pixels of different classes are never pooled).

Exactness
---------
All curves are evaluated at *every distinct score value* (no threshold grid, no histogram): the
scores are sorted once, tied scores are grouped into one threshold, and true/false positive
counts are cumulative sums over the sorted order. Tied scores are therefore handled exactly like
``sklearn.metrics.roc_auc_score`` / ``average_precision_score``. Image-level functions keep the
input dtype. Pixel-level metrics work on **float32** maps: exactness is with respect to the
float32 values (two float64 map values that round to the same float32 are one threshold).

Speed and memory of the pixel metrics
-------------------------------------
Every pixel curve only changes its "positive" coordinate (TP, or PRO for AUPRO) at scores of
anomalous pixels, which are few (a few per cent of the pixels). Per class, the normal pixels are
sorted once (float32 values only, in place, numpy's SIMD sort), the anomalous pixels are sorted
with their region ids, and two binary searches per distinct anomalous score give the false
positive counts; AUROC (as an exact integer sum), AP, F1-max and AUPRO follow from these
O(#anomalous) arrays (see :func:`pixel_metrics`). Extra memory is about 10 bytes per pixel of
the class being evaluated (sorted copy of the normal scores, region ids). Classes are evaluated
in a small thread pool (numpy's sort releases the GIL). Measured figures: ``docs/benchmarks.md``
(section "Metrics (issue 2)").

Dependencies: numpy; ``pandas`` (for :func:`compute_metrics`), ``scipy`` (connected components)
and ``torch`` (only the fallback when scipy is missing) are imported lazily. It never imports
kedro or mlflow.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = [
    "METRIC_NAMES",
    "IMAGE_METRIC_NAMES",
    "PIXEL_METRIC_NAMES",
    "binary_clf_curve",
    "roc_curve",
    "pr_curve",
    "auroc",
    "average_precision",
    "f1_max",
    "image_metrics",
    "label_regions",
    "pro_curve",
    "aupro",
    "pixel_metrics",
    "compute_metrics",
]

METRIC_NAMES: tuple[str, ...] = (
    "image_auroc",
    "image_ap",
    "image_f1max",
    "pixel_auroc",
    "pixel_ap",
    "pixel_f1max",
    "pixel_aupro",
)
IMAGE_METRIC_NAMES: tuple[str, ...] = METRIC_NAMES[:3]
PIXEL_METRIC_NAMES: tuple[str, ...] = METRIC_NAMES[3:]

#: FPR integration limit of AUPRO (Bergmann et al. 2021 use 30 %).
DEFAULT_FPR_LIMIT = 0.3


# ----------------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------------
def _as_binary_labels(labels: Any, name: str = "labels") -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {y.shape}")
    if y.dtype == np.bool_:
        return y
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise ValueError(f"{name} must be numeric or bool, got dtype {y.dtype}")
    bad = ~np.isin(y, (0, 1))
    if bad.any():
        raise ValueError(
            f"{name} must contain only 0 and 1; found {np.unique(y[bad])[:5].tolist()}"
        )
    return y.astype(np.bool_)


def _as_scores(scores: Any, n: int, name: str = "scores") -> np.ndarray:
    s = np.asarray(scores)
    if s.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {s.shape}")
    if s.shape[0] != n:
        raise ValueError(f"{name} has {s.shape[0]} entries but labels has {n}")
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)
    if np.isnan(s).any():
        raise ValueError(f"{name} contains NaN")
    return s


# ----------------------------------------------------------------------------------------------
# generic (image-level) curves: exact over distinct thresholds
# ----------------------------------------------------------------------------------------------
def binary_clf_curve(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative true/false positive counts at every distinct score, thresholds descending.

    Returns ``(thresholds, tps, fps)``: ``tps[k]`` / ``fps[k]`` count positives / negatives with
    ``score >= thresholds[k]``. Tied scores form one threshold (as in scikit-learn). One sort, no
    loop over thresholds.
    """
    y = _as_binary_labels(labels)
    s = _as_scores(scores, y.shape[0])
    if y.size == 0:
        raise ValueError("labels and scores are empty")
    order = np.argsort(s, kind="stable")[::-1]  # descending score
    s_sorted = s[order]
    y_sorted = y[order]
    # last index of each group (!= rather than np.diff: inf - inf is NaN)
    ends = np.append(np.flatnonzero(s_sorted[1:] != s_sorted[:-1]), s_sorted.size - 1)
    tps = np.cumsum(y_sorted, dtype=np.int64)[ends]
    fps = ends + 1 - tps
    return s_sorted[ends], tps, fps


def roc_curve(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve ``(fpr, tpr, thresholds)`` at every distinct threshold, descending.

    Starts at ``(0, 0)`` with threshold ``+inf`` (like scikit-learn); no point is dropped. ``fpr``
    (``tpr``) is NaN when there are no negatives (positives).
    """
    thr, tps, fps = binary_clf_curve(labels, scores)
    tps = np.concatenate([[0], tps])
    fps = np.concatenate([[0], fps])
    thr = np.concatenate([[np.inf], thr])
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = tps / tps[-1] if tps[-1] > 0 else np.full(tps.shape, np.nan)
        fpr = fps / fps[-1] if fps[-1] > 0 else np.full(fps.shape, np.nan)
    return fpr, tpr, thr


def pr_curve(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision-recall curve ``(precision, recall, thresholds)``, thresholds **descending**.

    The first point is ``(precision=1, recall=0)`` at threshold ``+inf`` (scikit-learn appends
    the same point at the end of its increasing-threshold arrays). Recall is NaN when there are
    no positives.
    """
    thr, tps, fps = binary_clf_curve(labels, scores)
    precision = np.concatenate([[1.0], tps / (tps + fps)])
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.concatenate([[0.0], tps / tps[-1]]) if tps[-1] > 0 else np.full(
            tps.size + 1, np.nan
        )
    return precision, recall, np.concatenate([[np.inf], thr])


def _auroc_from_counts(tps: np.ndarray, fps: np.ndarray) -> float:
    """Trapezoidal ROC area from cumulative counts (exact integer sum, one division)."""
    p, n = int(tps[-1]), int(fps[-1])
    if p == 0 or n == 0:
        return math.nan
    tp = np.concatenate([[0], tps]).astype(np.int64)
    fp = np.concatenate([[0], fps]).astype(np.int64)
    twice_area = int(np.sum(np.diff(fp) * (tp[1:] + tp[:-1])))
    return twice_area / (2.0 * p * n)


def auroc(labels: Any, scores: Any) -> float:
    """Area under the ROC curve, exact (agrees with ``sklearn.metrics.roc_auc_score``).

    NaN when only one class is present (scikit-learn raises instead).
    """
    _, tps, fps = binary_clf_curve(labels, scores)
    return _auroc_from_counts(tps, fps)


def _ap_from_counts(tps: np.ndarray, fps: np.ndarray) -> float:
    p = tps[-1]
    if p == 0:
        return math.nan
    d_tp = np.diff(np.concatenate([[0], tps]))
    return float(np.sum(d_tp / p * (tps / (tps + fps))))


def average_precision(labels: Any, scores: Any) -> float:
    """Average precision ``sum_k (R_k - R_{k-1}) P_k`` over distinct thresholds, descending.

    Agrees with ``sklearn.metrics.average_precision_score`` (step-wise, not interpolated). NaN
    when there are no positives.
    """
    _, tps, fps = binary_clf_curve(labels, scores)
    return _ap_from_counts(tps, fps)


def f1_from_counts(tps: np.ndarray, fps: np.ndarray) -> np.ndarray:
    """F1 at every threshold of :func:`binary_clf_curve`: ``2 TP / (TP + FP + P)``."""
    return 2.0 * tps / (tps + fps + tps[-1])


def _f1max_from_counts(tps: np.ndarray, fps: np.ndarray) -> float:
    if tps[-1] == 0:
        return math.nan
    return float(np.max(f1_from_counts(tps, fps)))


def f1_max(labels: Any, scores: Any) -> float:
    """Maximum F1 over all distinct thresholds (``score >= t`` predicts anomalous).

    ``F1 = 2 TP / (2 TP + FP + FN) = 2 TP / (TP + FP + P)``. NaN when there are no positives.
    """
    _, tps, fps = binary_clf_curve(labels, scores)
    return _f1max_from_counts(tps, fps)


def image_metrics(labels: Any, scores: Any) -> dict[str, float]:
    """``image_auroc``, ``image_ap``, ``image_f1max`` from one sort. NaN where undefined."""
    _, tps, fps = binary_clf_curve(labels, scores)
    return {
        "image_auroc": _auroc_from_counts(tps, fps),
        "image_ap": _ap_from_counts(tps, fps),
        "image_f1max": _f1max_from_counts(tps, fps),
    }


# ----------------------------------------------------------------------------------------------
# connected components of ground-truth masks
# ----------------------------------------------------------------------------------------------
def _label_regions_torch(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components by iterated 3x3 max-propagation (fallback when scipy is absent)."""
    import torch

    m = torch.from_numpy(np.ascontiguousarray(masks, dtype=np.bool_))
    n, h, w = m.shape
    if not bool(m.any()):
        return np.zeros((n, h, w), dtype=np.int32), 0
    ids = torch.arange(1, n * h * w + 1, dtype=torch.float64).reshape(n, 1, h, w)
    lab = ids * m.unsqueeze(1)  # N, 1, H, W ; 0 outside masks
    mf = m.unsqueeze(1).to(torch.float64)
    while True:
        new = torch.nn.functional.max_pool2d(lab, 3, stride=1, padding=1) * mf
        if torch.equal(new, lab):
            break
        lab = new
    lab = lab[:, 0].to(torch.int64).numpy()
    uniq, inv = np.unique(lab, return_inverse=True)  # uniq[0] == 0 (background exists or not)
    inv = inv.reshape(lab.shape)
    if uniq[0] != 0:
        inv = inv + 1
    return inv.astype(np.int32), int(np.count_nonzero(uniq))


def label_regions(masks: Any) -> tuple[np.ndarray, int]:
    """Connected components (8-connectivity) of every mask, ids unique across the stack.

    ``masks``: (N, H, W) bool. Returns ``(region_ids (N, H, W) int32, n_regions)`` with 0 for
    normal pixels and ``1..n_regions`` for the regions (components never cross images). Uses
    ``scipy.ndimage.label`` with a structure that connects the 8 in-plane neighbours only; falls
    back to a torch implementation when scipy is not installed.
    """
    m = np.asarray(masks).astype(np.bool_, copy=False)
    if m.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {m.shape}")
    try:
        from scipy import ndimage
    except ImportError:  # pragma: no cover - exercised via _label_regions_torch in tests
        return _label_regions_torch(m)
    structure = np.zeros((3, 3, 3), dtype=np.bool_)
    structure[1] = True  # 8-connected inside one image, nothing across images
    ids = np.zeros(m.shape, dtype=np.int32)
    has = np.flatnonzero(m.reshape(m.shape[0], -1).any(axis=1))  # only images with a defect
    if has.size == 0:
        return ids, 0
    sub, n = ndimage.label(m[has], structure=structure, output=np.int32)
    ids[has] = sub
    return ids, int(n)


# ----------------------------------------------------------------------------------------------
# pixel-level metrics: sort the normal pixels, walk the distinct anomalous-pixel scores
# ----------------------------------------------------------------------------------------------
def _check_masks_maps(masks: Any, maps: Any) -> tuple[np.ndarray, np.ndarray]:
    m = np.asarray(masks)
    a = np.asarray(maps)
    if a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if a.ndim != 3:
        raise ValueError(f"maps must be (N, H, W) or (N, 1, H, W), got shape {a.shape}")
    if m.shape != a.shape:
        raise ValueError(f"masks shape {m.shape} does not match maps shape {a.shape}")
    if m.dtype != np.bool_:
        if ((m != 0) & (m != 1)).any():
            raise ValueError("masks must be binary (bool or 0/1); a 0/255 mask needs masks > 0")
        m = m.astype(np.bool_)
    a = np.asarray(a, dtype=np.float32)
    if np.isnan(a).any():
        raise ValueError("maps contain NaN")
    return m, a


def _region_weights(region_ids: np.ndarray, n_regions: int) -> np.ndarray:
    """Per-region pixel weight ``1 / (|r| * R)``; index 0 (normal pixels) has weight 0.

    ``region_ids``: the region id of every pixel, or only of the anomalous ones.
    """
    sizes = np.bincount(region_ids.reshape(-1), minlength=n_regions + 1)[: n_regions + 1]
    w = np.zeros(n_regions + 1, dtype=np.float64)
    if n_regions:
        w[1:] = 1.0 / (sizes[1:].astype(np.float64) * n_regions)
    return w


def _trapezoid_upto(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area under the polyline (x non-decreasing) over ``[x[0], limit]``.

    The polyline is cut at exactly ``limit`` by linear interpolation on the crossing segment
    (as the official MVTec-AD evaluation does).
    """
    i = int(np.searchsorted(x, limit, side="right"))  # x[:i] <= limit < x[i:]
    area = float(np.sum(np.diff(x[:i]) * (y[1:i] + y[: i - 1]))) / 2.0
    if 0 < i < x.size and x[i - 1] < limit:
        x0, x1, y0, y1 = x[i - 1], x[i], y[i - 1], y[i]
        y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        area += (limit - x0) * (y0 + y_lim) / 2.0
    return area


def pixel_metrics(
    masks: Any, maps: Any, fpr_limit: float = DEFAULT_FPR_LIMIT
) -> dict[str, float]:
    """Pixel AUROC, AP, F1-max and AUPRO of one group of maps (one class).

    ``masks``: (N, H, W) bool ground truth; ``maps``: (N, H, W) anomaly maps (cast to float32).
    Exact at every distinct float32 value (ties grouped as in scikit-learn).

    AUPRO follows Bergmann et al. (MVTec-AD, IJCV 2021, and the official MVTec-AD evaluation
    code): regions are the 8-connected components of the masks; at threshold ``t`` PRO is the
    mean over all regions (of all images) of the fraction of the region's pixels with
    ``score >= t``, FPR is computed over all normal pixels (outside any mask, all images); PRO
    is integrated over FPR in ``[0, fpr_limit]`` with the trapezoidal rule (linear interpolation
    at ``fpr_limit``) and divided by ``fpr_limit``. Since
    ``PRO(t) = sum_{anomalous p: score_p >= t} 1 / (|r(p)| R)``, PRO is a cumulative sum of
    per-pixel weights over the anomalous pixels in descending score order.

    Algorithm (O(n log n), no loop over thresholds). All four curves only change their
    "positive" coordinate (TP, PRO) at scores of anomalous pixels; between two consecutive
    distinct anomalous scores ``t_{k-1} > t_k`` the curve moves horizontally (only FP grows).
    So the normal pixels are sorted once (values only, float32), the few anomalous pixels are
    sorted with their region ids, and at every distinct anomalous score ``t_k`` two binary
    searches give ``FP(> t_k)`` and ``FP(>= t_k)``. The exact curve through *all* distinct
    thresholds is then the polyline ``(FP(>t_k), TP_{k-1}) -> (FP(>=t_k), TP_k)`` (the points at
    normal-only thresholds lie on its horizontal pieces), which gives

    * AUROC as an exact integer trapezoid sum (equal to the Mann-Whitney statistic with ties
      counted one half),
    * AP = ``sum_k (TP_k - TP_{k-1}) / P * TP_k / (TP_k + FP(>= t_k))``,
    * F1-max = ``max_k 2 TP_k / (TP_k + FP(>= t_k) + P)`` (lowering a threshold without a new
      true positive only adds false positives, so the maximum is at some ``t_k``),
    * AUPRO from the same polyline with PRO in place of TP.

    Returns NaN for metrics that are undefined (no anomalous or no normal pixel).
    """
    m, a = _check_masks_maps(masks, maps)
    if m.size == 0:
        raise ValueError("masks and maps are empty")
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    nan = math.nan
    region_ids, n_regions = label_regions(m)
    pos_codes = region_ids[m]  # (P,) region of each anomalous pixel
    del region_ids
    weights = _region_weights(pos_codes, n_regions)
    pos = a[m]  # (P,) float32
    neg = a[~m]  # (Nn,) float32, a copy we may sort in place
    n_pos, n_neg = pos.size, neg.size
    if n_pos == 0:
        return dict.fromkeys(PIXEL_METRIC_NAMES, nan)
    neg.sort()  # ascending, values only (numpy's SIMD sort where available)

    order = np.argsort(pos)[::-1]  # descending anomalous scores
    sp = pos[order]
    ends = np.append(np.flatnonzero(sp[1:] != sp[:-1]), sp.size - 1)  # last of each tie group
    thr = sp[ends]  # (K,) distinct anomalous scores, descending
    tp = (ends + 1).astype(np.int64)  # TP(>= t_k)
    pro = np.cumsum(weights[pos_codes[order]])[ends]  # PRO(t_k)
    fp_ge = n_neg - np.searchsorted(neg, thr, side="left").astype(np.int64)  # FP(>= t_k)
    fp_gt = n_neg - np.searchsorted(neg, thr, side="right").astype(np.int64)  # FP(> t_k)
    tp_prev = np.concatenate([[0], tp[:-1]])

    f1 = float(np.max(2.0 * tp / (tp + fp_ge + n_pos)))
    ap = float(np.sum((tp - tp_prev) * (tp / (tp + fp_ge)))) / n_pos
    if n_neg == 0:
        return {"pixel_auroc": nan, "pixel_ap": ap, "pixel_f1max": f1, "pixel_aupro": nan}

    # twice the ROC area in units of one TP x one FP: horizontal pieces, tie pieces, tail
    fp_ge_prev = np.concatenate([[0], fp_ge[:-1]])
    twice_auc = (
        int(np.sum(2 * tp_prev * (fp_gt - fp_ge_prev)))
        + int(np.sum((fp_ge - fp_gt) * (tp_prev + tp)))
        + 2 * n_pos * (n_neg - int(fp_ge[-1]))
    )
    auroc_value = twice_auc / (2.0 * n_pos * n_neg)

    # PRO polyline: (0, 0), then (FPR(>t_k), PRO_{k-1}) and (FPR(>=t_k), PRO_k) for each k,
    # then (1, PRO_K)
    x = np.empty(2 * thr.size + 2)
    y = np.empty_like(x)
    x[0], y[0] = 0.0, 0.0
    x[1:-1:2], x[2:-1:2] = fp_gt / n_neg, fp_ge / n_neg
    y[1:-1:2], y[2:-1:2] = np.concatenate([[0.0], pro[:-1]]), pro
    x[-1], y[-1] = 1.0, pro[-1]
    limit = float(fpr_limit)
    return {
        "pixel_auroc": auroc_value,
        "pixel_ap": ap,
        "pixel_f1max": f1,
        "pixel_aupro": float(_trapezoid_upto(x, y, limit) / limit),
    }


def aupro(masks: Any, maps: Any, fpr_limit: float = DEFAULT_FPR_LIMIT) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` (see :func:`pixel_metrics`)."""
    return pixel_metrics(masks, maps, fpr_limit)["pixel_aupro"]


def pro_curve(masks: Any, maps: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Full PRO curve ``(fpr, pro, thresholds)`` at every distinct float32 value, descending.

    Starts at ``(0, 0)`` with threshold ``+inf``. Holds the whole curve in memory: meant for
    plots and tests on small data; use :func:`aupro` for the area.
    """
    m, a = _check_masks_maps(masks, maps)
    region_ids, n_regions = label_regions(m)
    weights = _region_weights(region_ids, n_regions)
    flat = a.reshape(-1)
    order = np.argsort(flat, kind="stable")[::-1]
    s = flat[order]
    codes = region_ids.reshape(-1)[order]
    ends = np.append(np.flatnonzero(s[1:] != s[:-1]), s.size - 1)
    fp = np.cumsum(codes == 0)[ends]
    pro = np.cumsum(weights[codes])[ends]
    n_neg = int(np.count_nonzero(codes == 0))
    fpr = fp / n_neg if n_neg else np.full(fp.shape, np.nan)
    return (
        np.concatenate([[0.0], fpr]),
        np.concatenate([[0.0], pro]),
        np.concatenate([[np.inf], s[ends].astype(np.float64)]),
    )


# ----------------------------------------------------------------------------------------------
# the per-class table
# ----------------------------------------------------------------------------------------------
def compute_metrics(
    labels: Any,
    scores: Any,
    masks: Any = None,
    maps: Any = None,
    class_names: Sequence[str] | np.ndarray | None = None,
    *,
    pixel: bool = True,
    fpr_limit: float = DEFAULT_FPR_LIMIT,
    n_jobs: int | None = None,
) -> "pd.DataFrame":
    """Per-class image and pixel metrics plus their class mean.

    Args:
        labels: (N,) 0 = normal, 1 = anomalous image.
        scores: (N,) image anomaly scores (higher = more anomalous).
        masks: (N, H, W) binary ground-truth masks (all-zero for normal images); ``(N, 1, H, W)``
            is accepted. May be ``None`` when ``pixel=False``.
        maps: (N, H, W) anomaly maps, same shape as ``masks``; cast to float32.
        class_names: (N,) class of each image; ``None`` puts everything in one class ``"all"``.
        pixel: ``False`` skips the pixel metrics (their columns are NaN), e.g. when a dataset
            has no masks.
        fpr_limit: AUPRO integration limit (0.3 in the papers).
        n_jobs: classes evaluated concurrently (threads); default ``min(4, cpu_count)``. The
            peak extra memory grows with it (about 10 bytes per pixel of each class in flight).

    Returns:
        ``pandas.DataFrame`` indexed by class name (sorted) with one column per
        :data:`METRIC_NAMES`, and a last row ``mean`` = mean over classes (each class counts
        once, as in the papers). A metric undefined for a class is NaN there (e.g. image metrics
        of a class without anomalous or without normal test images, pixel metrics of a class
        whose masks are all empty) and that class is **skipped** in the mean of that metric;
        the mean is NaN only if no class defines it.
    """
    import pandas as pd

    y = _as_binary_labels(labels)
    n = y.shape[0]
    if n == 0:
        raise ValueError("no samples: labels is empty")
    s = _as_scores(scores, n)
    if class_names is None:
        cls = np.full(n, "all", dtype=object)
    else:
        cls = np.asarray(class_names).astype(str)
        if cls.shape != (n,):
            raise ValueError(f"class_names must have shape ({n},) like labels, got {cls.shape}")
        if (cls == "mean").any():
            raise ValueError('"mean" is reserved for the average row and cannot be a class name')
    if pixel:
        if masks is None or maps is None:
            raise ValueError("pixel=True needs masks and maps; pass pixel=False to skip them")
        m, a = np.asarray(masks), np.asarray(maps)
        if a.ndim == 4 and a.shape[1] == 1:
            a = a[:, 0]
        if m.ndim == 4 and m.shape[1] == 1:
            m = m[:, 0]
        if a.ndim != 3 or a.shape[0] != n:
            raise ValueError(f"maps must be ({n}, H, W) to match labels, got shape {a.shape}")
        if m.shape != a.shape:
            raise ValueError(f"masks shape {m.shape} does not match maps shape {a.shape}")

    def row_of(c: str) -> dict[str, float]:
        idx = np.flatnonzero(cls == c)
        row = dict.fromkeys(METRIC_NAMES, math.nan)
        row.update(image_metrics(y[idx], s[idx]))
        if pixel:
            # a contiguous class is a view; otherwise only this class is copied
            sl = slice(idx[0], idx[-1] + 1) if idx[-1] - idx[0] + 1 == idx.size else idx
            row.update(pixel_metrics(m[sl], a[sl], fpr_limit))
        return row

    classes = sorted(set(cls.tolist()))
    workers = min(len(classes), n_jobs if n_jobs else min(4, os.cpu_count() or 1))
    if workers > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            rows = dict(zip(classes, pool.map(row_of, classes)))
    else:
        rows = {c: row_of(c) for c in classes}
    df = pd.DataFrame.from_dict(rows, orient="index", columns=list(METRIC_NAMES))
    df.loc["mean"] = df.mean(axis=0, skipna=True)
    df.index.name = "class_name"
    return df
