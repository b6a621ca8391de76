"""The metrics MVTec AD 2 and anomalib report beside the papers' seven: SegF1 at a threshold fixed
on validation normals, AU-PRO integrated to a second (lower) false-positive limit, and AUPIMO.

SegF1 (Heckler-Kram et al., "The MVTec AD 2 Dataset", arXiv 2503.21622, 2025, sec. "Evaluation")
    The pixel F1 score of one class's test maps binarised at one threshold ``t`` fixed before
    testing: ``SegF1 = 2 TP / (2 TP + FP + FN)``, the counts pooled over every pixel of every test
    image of the class (normal images contribute false positives only). ``t`` is chosen on the
    class's validation normals alone (:func:`uad.metrics.thresholds.normal_threshold`: the
    paper's baseline ``t = mean + 3 std`` of the validation pixel scores, ``rule="mean_std"``, or
    a false-positive rate, ``rule="fpr"``); the test maps are never read to choose it, which
    :func:`seg_f1` enforces by taking the validation maps, not a threshold.

AU-PRO at a limit
    :func:`uad.metrics.metrics.pixel_metrics` with ``fpr_limit``: MVTec AD 2 integrates the PRO
    curve to FPR 0.05 (MVTec-AD: 0.3). Logged as ``pixel_aupro_005`` (the limit in hundredths).

AUPIMO (Bertoldo, Ameln, Vaidya, Akçay: "AUPIMO: Redefining Anomaly Localization Benchmarks with
High Speed and Low Tolerance", arXiv 2401.01984, 2024, eq. 1-3)
    Per anomalous image ``i``: ``PIMO_i(t) = (TPR_i(t), SFPR(t))`` where ``TPR_i(t)`` is the
    fraction of image ``i``'s anomalous pixels with ``score >= t`` and the shared FPR ``SFPR(t)``
    is the mean over the *normal images* of the class of their fraction of pixels with
    ``score >= t`` (all maps have one size, so it is the pooled FPR of the normal images'
    pixels). ``AUPIMO_i = (1 / log(U / L)) * integral_{log L}^{log U} TPR_i d log(SFPR)`` with
    ``[L, U] = [1e-5, 1e-4]``; the class's AUPIMO is the mean over its anomalous images.
    Computed exactly here: the curve through every distinct normal score, each piece between
    two of them linear in ``log SFPR`` (the trapezoid rule on the log axis), cut at ``L`` and
    ``U`` by interpolation on the log axis. Below the smallest reachable non-zero shared FPR
    ``1 / n_normal_pixels`` the curve is flat at the TPR of the threshold just above every normal
    score (the limit of that interpolation when one end is at FPR 0, log = -inf), so a class with
    fewer than ``1 / L`` normal pixels still has a defined AUPIMO.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from .metrics import _check_masks_maps, pixel_metrics
from .thresholds import normal_threshold

__all__ = ["AUPIMO_FPR_RANGE", "aupimo", "aupimo_per_image", "aupro_name", "extra_metric_names", "extra_metrics",
           "seg_f1", "seg_f1_at"]

#: the AUPIMO paper's shared-FPR integration range
AUPIMO_FPR_RANGE: tuple[float, float] = (1e-5, 1e-4)


def aupro_name(limit: float) -> str:
    """``pixel_aupro_005`` for limit 0.05: the metric's name carries its limit in hundredths."""
    return f"pixel_aupro_{int(round(float(limit) * 100)):03d}"


def extra_metric_names(second_limit: float = 0.05) -> tuple[str, ...]:
    return ("pixel_segf1", aupro_name(second_limit), "pixel_aupimo")


def seg_f1_at(masks: Any, maps: Any, threshold: float) -> float:
    """Pooled pixel F1 of ``maps >= threshold`` against ``masks`` (NaN when the class has no
    anomalous pixel and flags none)."""
    m, a = _check_masks_maps(masks, maps)
    pred = a >= np.float32(threshold)
    tp = int(np.count_nonzero(pred & m))
    fp = int(np.count_nonzero(pred)) - tp
    fn = int(np.count_nonzero(m)) - tp
    den = 2 * tp + fp + fn
    return 2.0 * tp / den if den else math.nan


def seg_f1(masks: Any, maps: Any, validation_maps: Any, rule: str = "mean_std", k: float = 3.0,
           fpr: float = 0.01) -> tuple[float, float]:
    """``(SegF1, threshold)``: the threshold from the validation normals' pixel scores alone
    (``rule``, ``k``, ``fpr`` as :func:`uad.metrics.thresholds.normal_threshold`), then
    :func:`seg_f1_at` on the test ``masks`` / ``maps``."""
    v = np.asarray(validation_maps, dtype=np.float32).ravel()
    if v.size == 0:
        return math.nan, math.nan
    t = normal_threshold(v, rule, fpr, k)
    return seg_f1_at(masks, maps, t), float(t)


def aupimo_per_image(masks: Any, maps: Any, labels: Any, fpr_range: tuple[float, float] = AUPIMO_FPR_RANGE
                     ) -> np.ndarray:
    """AUPIMO of every image (NaN for normal images and anomalous ones with an empty mask); see
    the module docstring. ``labels``: 1 anomalous image, 0 normal (the shared FPR's images)."""
    m, a = _check_masks_maps(masks, maps)
    y = np.asarray(labels).astype(np.int64).ravel()
    if y.shape[0] != m.shape[0]:
        raise ValueError(f"labels has {y.shape[0]} entries for {m.shape[0]} maps")
    lo, hi = (float(fpr_range[0]), float(fpr_range[1]))
    if not 0.0 < lo < hi <= 1.0:
        raise ValueError(f"the AUPIMO FPR range must satisfy 0 < L < U <= 1, got {fpr_range}")
    out = np.full(y.shape[0], np.nan)
    normal = a[y == 0].ravel()
    if normal.size == 0:
        return out
    neg = np.sort(normal)[::-1]  # descending
    n_neg = neg.size
    ends = np.append(np.flatnonzero(neg[1:] != neg[:-1]), n_neg - 1)
    thr = neg[ends]  # distinct normal scores, descending
    fpr_ge = (ends + 1) / n_neg  # SFPR(>= t_k), increasing
    fpr_gt = np.concatenate([[0.0], fpr_ge[:-1]])  # SFPR(> t_k)
    # the pieces (fpr_gt_k, TPR(> t_k)) -> (fpr_ge_k, TPR(>= t_k)) that overlap [lo, hi]
    keep = (fpr_ge > lo) & (fpr_gt < hi)  # the pieces tile [0, 1]: at least one overlaps
    t_k, x0, x1 = thr[keep], fpr_gt[keep], fpr_ge[keep]
    with np.errstate(divide="ignore"):
        u0, u1 = np.log(x0), np.log(x1)  # u0 = -inf for the piece starting at FPR 0
    ul, uh = math.log(lo), math.log(hi)
    a0, a1 = np.maximum(u0, ul), np.minimum(u1, uh)  # the clipped piece [a0, a1]
    width = np.maximum(a1 - a0, 0.0)
    finite = np.isfinite(u0)
    span = np.where(finite, u1 - u0, 1.0)
    # linear weights of the piece's end values at a0 and a1 (flat where it starts at FPR 0)
    w_a0 = np.where(finite, (a0 - u0) / np.where(span > 0, span, 1.0), 0.0)
    w_a1 = np.where(finite, (a1 - u0) / np.where(span > 0, span, 1.0), 0.0)
    for i in np.flatnonzero((y == 1) & m.reshape(m.shape[0], -1).any(axis=1)):
        pos = np.sort(a[i][m[i]])
        n_pos = pos.size
        tpr_gt = (n_pos - np.searchsorted(pos, t_k, side="right")) / n_pos
        tpr_ge = (n_pos - np.searchsorted(pos, t_k, side="left")) / n_pos
        y_a0 = tpr_gt + (tpr_ge - tpr_gt) * w_a0
        y_a1 = tpr_gt + (tpr_ge - tpr_gt) * w_a1
        out[i] = float(np.sum(width * (y_a0 + y_a1) / 2.0) / (uh - ul))
    return out


def aupimo(masks: Any, maps: Any, labels: Any, fpr_range: tuple[float, float] = AUPIMO_FPR_RANGE) -> float:
    """The mean AUPIMO over the anomalous images (NaN without normal or anomalous images)."""
    per = aupimo_per_image(masks, maps, labels, fpr_range)
    per = per[np.isfinite(per)]
    return float(per.mean()) if per.size else math.nan


def extra_metrics(labels: Any, masks: Any, maps: Any, class_names: Sequence[str] | np.ndarray,
                  validation_maps: Any = None, validation_class_names: Sequence[str] | np.ndarray | None = None,
                  rule: str = "mean_std", k: float = 3.0, fpr: float = 0.01, second_limit: float = 0.05,
                  fpr_range: tuple[float, float] = AUPIMO_FPR_RANGE) -> "Any":
    """Per class (and the ``mean`` row over classes, NaN-skipping like
    :func:`uad.metrics.metrics.compute_metrics`): ``pixel_segf1`` (NaN for a class without
    validation maps), ``pixel_aupro_<limit>`` and ``pixel_aupimo``; plus ``segf1_threshold``.
    A ``pandas.DataFrame`` indexed by class name."""
    import pandas as pd

    y = np.asarray(labels).astype(np.int64).ravel()
    cls = np.asarray(class_names).astype(str)
    m, a = _check_masks_maps(masks, maps)
    vcls = None if validation_class_names is None else np.asarray(validation_class_names).astype(str)
    names = extra_metric_names(second_limit)
    rows: dict[str, dict[str, float]] = {}
    for c in sorted(set(cls.tolist())):
        idx = np.flatnonzero(cls == c)
        row = dict.fromkeys((*names, "segf1_threshold"), math.nan)
        if m[idx].any():
            row[names[1]] = pixel_metrics(m[idx], a[idx], second_limit)["pixel_aupro"]
            row["pixel_aupimo"] = aupimo(m[idx], a[idx], y[idx], fpr_range)
            if validation_maps is not None and vcls is not None and (vcls == c).any():
                row["pixel_segf1"], row["segf1_threshold"] = seg_f1(m[idx], a[idx],
                                                                    np.asarray(validation_maps)[vcls == c], rule, k, fpr)
        rows[c] = row
    df = pd.DataFrame.from_dict(rows, orient="index", columns=[*names, "segf1_threshold"])
    df.loc["mean"] = df.mean(axis=0, skipna=True)
    df.index.name = "class_name"
    return df
