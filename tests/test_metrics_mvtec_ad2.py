"""SegF1, AU-PRO at a second limit and AUPIMO: hand-computed cases, an independent brute-force
reference, and the wrong variants they must not equal."""

from __future__ import annotations

import math

import numpy as np
import pytest

from uad.metrics.metrics import aupro
from uad.metrics.mvtec_ad2 import aupimo, aupimo_per_image, extra_metrics, seg_f1, seg_f1_at


def _aupimo_case(tie: bool = False):
    """One normal image of 200,000 pixels: 2 at 0.9 (SFPR 1e-5), 8 at 0.7 (5e-5), 10 at 0.5 (1e-4),
    the rest 0; one anomalous image whose 4 mask pixels score 1.0, 0.8, 0.6, 0.55."""
    normal = np.zeros((400, 500), np.float32)
    flat = normal.reshape(-1)
    flat[:2], flat[2:10], flat[10:20] = 0.9, 0.7, 0.5
    anom = np.zeros((400, 500), np.float32)
    mask = np.zeros((400, 500), bool)
    mask[0, :4] = True
    anom[0, :4] = [1.0, 0.8, 0.6, 0.5 if tie else 0.55]
    return np.stack([mask * 0, mask]).astype(bool), np.stack([normal, anom]), np.array([0, 1])


def test_aupimo_hand_computed_and_not_the_linear_axis():
    masks, maps, labels = _aupimo_case()
    # TPR 1/2 on SFPR [1e-5, 5e-5], 1 on [5e-5, 1e-4]; on the log axis: (0.5 log 5 + log 2) / log 10
    want = (0.5 * math.log(5) + math.log(2)) / math.log(10)
    assert aupimo(masks, maps, labels) == pytest.approx(want, abs=1e-12)
    assert want == pytest.approx(0.650515, abs=1e-6)
    linear_axis = (0.5 * 4e-5 + 1.0 * 5e-5) / 9e-5  # 0.7778: the wrong (linear FPR) variant
    assert abs(aupimo(masks, maps, labels) - linear_axis) > 0.1
    # a tie at a normal score: the piece (5e-5, 3/4) -> (1e-4, 1) is linear in log SFPR
    masks, maps, labels = _aupimo_case(tie=True)
    want = (0.5 * math.log(5) + 0.875 * math.log(2)) / math.log(10)
    assert aupimo(masks, maps, labels) == pytest.approx(want, abs=1e-12)
    # the shared FPR reads normal images only: counting the anomalous image's normal pixels is wrong
    per = aupimo_per_image(masks, maps, labels)
    assert np.isnan(per[0]) and per[1] == pytest.approx(want)


def _brute_aupimo(masks, maps, labels, lo=1e-5, hi=1e-4, grid=200001):
    """Independent reference: the PIMO curve at every distinct score (numpy comparisons, no
    sorting tricks), the polyline in log SFPR sampled on a dense grid."""
    normal = maps[labels == 0].ravel()
    thresholds = np.unique(maps)[::-1]
    out = []
    for i in np.flatnonzero(labels == 1):
        pos = maps[i][masks[i]]
        xs, ys = [0.0], [float((pos > thresholds[0]).mean())]
        for t in thresholds:
            xs.append(float((normal >= t).mean()))
            ys.append(float((pos >= t).mean()))
        xs, ys = np.array(xs), np.array(ys)
        u = np.linspace(math.log(lo), math.log(hi), grid)
        with np.errstate(divide="ignore"):
            lx = np.log(xs)
        # interpolate the polyline on the log axis; points at FPR 0 extend it flat to -inf
        vals = np.empty_like(u)
        for j, uu in enumerate(u):
            k = int(np.searchsorted(lx, uu, side="right"))  # lx[k-1] <= uu < lx[k]
            k = min(max(k, 1), len(lx) - 1)
            x0, x1, y0, y1 = lx[k - 1], lx[k], ys[k - 1], ys[k]
            vals[j] = y0 if not np.isfinite(x0) or x1 == x0 else y0 + (y1 - y0) * (uu - x0) / (x1 - x0)
        out.append(np.trapezoid(vals, u) / (u[-1] - u[0]))
    return float(np.mean(out))


def test_aupimo_matches_a_brute_force_reference_on_random_maps():
    rng = np.random.default_rng(0)
    n, h, w = 6, 120, 150  # 3 normal images: 54,000 normal pixels (below 1 / 1e-5: the flat low end is used)
    maps = rng.gamma(2.0, 1.0, (n, h, w)).astype(np.float32).round(2)  # ties on purpose
    labels = np.array([0, 0, 0, 1, 1, 1])
    masks = np.zeros((n, h, w), bool)
    masks[3, 10:30, 10:40] = True
    masks[4, 50:52, 60:100] = True
    masks[5, 100:119, 0:5] = True
    maps[masks] += 2.0
    got = aupimo(masks, maps, labels)
    assert got == pytest.approx(_brute_aupimo(masks, maps, labels, grid=4001), abs=2e-4)


def test_aupro_limit_is_a_parameter_hand_computed():
    # 1 anomalous pixel scoring below 2 of 100 normal pixels: PRO jumps 0 -> 1 at FPR 0.02
    maps = np.linspace(0.0, 1.0, 101, dtype=np.float32)[None, None, :]
    masks = np.zeros_like(maps, dtype=bool)
    masks[0, 0, 98] = True  # score 0.98: normals 0.99 and 1.0 are above it
    assert aupro(masks, maps, 0.05) == pytest.approx((0.05 - 0.02) / 0.05)
    assert aupro(masks, maps, 0.3) == pytest.approx((0.3 - 0.02) / 0.3)
    assert aupro(masks, maps, 0.05) != pytest.approx(aupro(masks, maps, 0.3))  # the wrong limit fails


def test_segf1_hand_computed_and_threshold_from_validation_only():
    masks = np.zeros((2, 2, 4), bool)
    masks[1, 0, :2] = True  # 2 anomalous pixels
    maps = np.array([[[0, 1, 2, 5], [0, 0, 0, 0]], [[6, 4, 3, 0], [0, 0, 0, 0]]], np.float32)
    val = np.array([[1.0, 3.0]])  # mean 2, std 1: t = 2 + 3 * 1 = 5
    f1, t = seg_f1(masks, maps, val, rule="mean_std", k=3)
    assert t == 5.0
    # >= 5: pixels 5 (normal image, FP) and 6 (TP); the 4 is missed (FN): 2*1 / (2 + 1 + 1)
    assert f1 == pytest.approx(0.5)
    # the wrong variant: the threshold chosen on the test maps (F1-optimal over every test score)
    best_on_test = max(seg_f1_at(masks, maps, t) for t in np.unique(maps))
    assert best_on_test == pytest.approx(2 * 2 / (2 * 2 + 1 + 0))  # t = 4: TP 2, FP 1 (the 5), FN 0
    assert f1 != pytest.approx(best_on_test)


def test_extra_metrics_table_per_class():
    masks, maps, labels = _aupimo_case()
    vmaps = np.zeros((1, 400, 500), np.float32)
    vmaps[0, 0, :2] = [0.0, 0.4]
    t = extra_metrics(labels, masks, maps, np.array(["x", "x"]), vmaps, np.array(["x"]), rule="mean_std", k=3)
    assert list(t.index) == ["x", "mean"]
    assert t.loc["x", "pixel_aupimo"] == pytest.approx(0.650515, abs=1e-6)
    thr = float(vmaps.mean() + 3 * vmaps.std())
    assert t.loc["x", "segf1_threshold"] == pytest.approx(thr, rel=1e-6)
    assert t.loc["x", "pixel_segf1"] == pytest.approx(seg_f1_at(masks, maps, thr))
    assert np.isfinite(t.loc["x", "pixel_aupro_005"])
    no_val = extra_metrics(labels, masks, maps, np.array(["x", "x"]))
    assert np.isnan(no_val.loc["x", "pixel_segf1"])  # no validation normals: no SegF1


def test_a_wrong_evaluation_setting_is_refused_even_where_it_would_not_be_used():
    """A typo in evaluation.segf1_rule was read only when the data had masks (and after training):
    now every setting is one ConfigError naming it, here on a normal-only split without masks."""
    from uad.errors import ConfigError
    from uad.metrics.evaluation import check_evaluation, evaluate_predictions

    preds = {"labels": np.array([0, 0]), "scores": np.array([0.1, 0.2]), "masks": np.zeros((2, 4, 4), bool),
             "maps": np.zeros((2, 4, 4), np.float32), "class_names": np.array(["x", "x"])}
    evaluate_predictions(preds, {})  # the defaults pass
    for bad, said in [({"segf1_rule": "mean+3std"}, "evaluation.segf1_rule: 'mean+3std' is not one of"),
                      ({"threshold_rule": "median"}, "evaluation.threshold_rule: 'median'"),
                      ({"threshold_std_k": "three"}, "evaluation.threshold_std_k: 'three'"),
                      ({"threshold_fpr": 1.5}, "evaluation.threshold_fpr: 1.5"),
                      ({"aupro_second_limit": 0}, "evaluation.aupro_second_limit: 0")]:
        with pytest.raises(ConfigError, match=said.replace("+", r"\+")):
            evaluate_predictions(preds, bad)
        with pytest.raises(ConfigError):
            check_evaluation(bad)
