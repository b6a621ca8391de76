"""Decision thresholds for scoring new images (``score >= threshold`` means anomalous).

Where the labelled test split has both normal and anomalous images, the image threshold is the
F1-optimal one on it (the threshold behind ``image_f1max``) and the pixel threshold the F1-optimal
one over the test pixels (behind ``pixel_f1max``). Where it has no anomalies (a production set of
normal images only), the thresholds are set for a chosen false-positive rate on those normal
images: at most ``fpr`` of them (of their pixels) score at or above the threshold. Which rule made
a threshold is recorded with it (``source``), next to the counts it was computed from.

Where validation normals are given (the ``validation`` split: normal images no method trains on,
MVTec AD 2's ``validation/good``), both thresholds come from them alone, never from the test split
(MVTec AD 2, Heckler-Kram et al. 2025: the threshold is fixed before testing on anomaly-free
validation images). ``rule="fpr"`` flags at most ``fpr`` of them (of their pixels);
``rule="mean_std"`` is the dataset paper's ``t = mu + k * sigma`` of their scores (pixel scores for
the pixel threshold), ``k = 3`` there. Sources ``validation_fpr`` / ``validation_mean_std``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .metrics import binary_clf_curve, f1_from_counts

__all__ = ["THRESHOLD_RULES", "compute_thresholds", "f1_optimal_threshold", "fpr_threshold", "normal_threshold"]

THRESHOLD_RULES: tuple[str, ...] = ("fpr", "mean_std")

#: pixels used at most for the pixel threshold (a deterministic stride subsample above that)
MAX_PIXELS = 4_000_000


def f1_optimal_threshold(labels: Any, scores: Any) -> tuple[float, float]:
    """``(threshold, F1)``: the distinct score ``t`` maximising F1 of ``score >= t`` (ties: the
    highest such ``t``)."""
    thr, tps, fps = binary_clf_curve(labels, scores)
    if int(tps[-1]) == 0 or int(fps[-1]) == 0:
        raise ValueError("an F1-optimal threshold needs both normal and anomalous samples")
    f1 = f1_from_counts(tps, fps)
    k = int(np.argmax(f1))
    return float(thr[k]), float(f1[k])


def fpr_threshold(normal_scores: Any, fpr: float) -> float:
    """The lowest threshold at which at most ``fpr`` of ``normal_scores`` satisfy
    ``score >= threshold`` (nothing flagged at ``fpr`` below ``1 / n``)."""
    s = np.sort(np.asarray(normal_scores, dtype=np.float64).ravel())[::-1]
    if s.size == 0:
        raise ValueError("a false-positive-rate threshold needs normal samples")
    if not 0.0 <= fpr < 1.0:
        raise ValueError(f"fpr must be in [0, 1), got {fpr}")
    allowed = int(math.floor(fpr * s.size + 1e-9))
    if allowed == 0:
        return float(np.nextafter(s[0], np.inf))
    t = s[allowed - 1]
    if allowed < s.size and s[allowed] == t:  # ties at t would flag more than allowed
        return float(np.nextafter(t, np.inf))
    return float(t)


def normal_threshold(normal_scores: Any, rule: str = "fpr", fpr: float = 0.01, k: float = 3.0) -> float:
    """A threshold set on normal scores alone: ``rule="fpr"`` -> :func:`fpr_threshold`;
    ``rule="mean_std"`` -> ``mean + k * std`` (population std, ``ddof=0``) of the scores, the MVTec AD 2
    paper's rule for SegF1 (``k = 3``)."""
    if rule == "fpr":
        return fpr_threshold(normal_scores, fpr)
    if rule == "mean_std":
        s = np.asarray(normal_scores, dtype=np.float64).ravel()
        if s.size == 0:
            raise ValueError("a mean + k std threshold needs normal samples")
        return float(s.mean() + float(k) * s.std())
    from uad.errors import ConfigError

    raise ConfigError(f"evaluation.threshold_rule: {rule!r} is not one of {', '.join(THRESHOLD_RULES)}; "
                      "e.g. --params=\"evaluation.threshold_rule=mean_std\"")


def _pixels(masks: np.ndarray, maps: np.ndarray, normal_only: bool) -> tuple[np.ndarray, np.ndarray]:
    m = masks.reshape(-1).astype(bool)
    v = maps.reshape(-1)
    if normal_only:
        v, m = v[~m], m[~m]
    if v.size > MAX_PIXELS:
        step = int(math.ceil(v.size / MAX_PIXELS))
        v, m = v[::step], m[::step]
    return m, v.astype(np.float32)


def compute_thresholds(labels: Any, scores: Any, masks: np.ndarray | None = None, maps: np.ndarray | None = None,
                       fpr: float = 0.01, validation_scores: Any = None, validation_maps: np.ndarray | None = None,
                       rule: str = "fpr", k: float = 3.0) -> dict[str, Any]:
    """Image (and, with ``masks`` / ``maps``, pixel) thresholds; see the module docstring.

    ``validation_scores`` / ``validation_maps``: the validation normals' image scores and maps;
    when given (non-empty), the thresholds come from them by ``rule`` (``fpr`` or ``mean_std``
    with ``k``) and the test split is not read for them.

    Returns a JSON-able dict: ``image`` / ``pixel`` thresholds, ``image_source`` /
    ``pixel_source`` (``f1_test``, ``fpr_normal``, ``validation_fpr`` or ``validation_mean_std``),
    ``fpr`` where used, the F1 reached, and the numbers of samples behind each."""
    y = np.asarray(labels).astype(np.int64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    out: dict[str, Any] = {"rule": "score >= threshold is anomalous", "n_images": int(y.size),
                           "n_anomalous": int(y.sum())}
    val = None if validation_scores is None else np.asarray(validation_scores, dtype=np.float64).ravel()
    if val is not None and val.size:
        normal_threshold(val[:1], rule, fpr, k)  # a wrong rule fails here, before any work
        source = f"validation_{rule}"
        out["image"], out["image_source"] = normal_threshold(val, rule, fpr, k), source
        out["n_validation_images"] = int(val.size)
        out["fpr" if rule == "fpr" else "std_k"] = float(fpr) if rule == "fpr" else float(k)
        if masks is not None and maps is not None and validation_maps is not None and len(validation_maps):
            vm = np.asarray(validation_maps)
            _, v = _pixels(np.zeros(vm.shape, bool), vm, normal_only=False)
            out["pixel"], out["pixel_source"] = normal_threshold(v, rule, fpr, k), source
            out["n_pixels"] = int(v.size)
        return out
    if 0 < y.sum() < y.size:
        out["image"], out["image_f1"] = f1_optimal_threshold(y, s)
        out["image_source"] = "f1_test"
    else:
        normal = s[y == 0] if (y == 0).any() else s
        out["image"], out["image_source"], out["fpr"] = fpr_threshold(normal, fpr), "fpr_normal", float(fpr)
    if masks is not None and maps is not None:
        has_defects = bool(np.asarray(masks).any())
        m, v = _pixels(np.asarray(masks), np.asarray(maps), normal_only=not has_defects)
        if has_defects and (~m).any():
            out["pixel"], out["pixel_f1"] = f1_optimal_threshold(m, v)
            out["pixel_source"] = "f1_test"
        else:
            out["pixel"], out["pixel_source"], out["fpr"] = fpr_threshold(v, fpr), "fpr_normal", float(fpr)
        out["n_pixels"] = int(v.size)
    return out
