"""uad.metrics: scikit-learn is the oracle for AUROC / AP, direct formulas for F1-max and AUPRO."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.stats import rankdata
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

import uad.metrics.metrics as M
from uad.metrics import (
    METRIC_NAMES,
    aupro,
    auroc,
    average_precision,
    compute_metrics,
    f1_max,
    image_metrics,
    label_regions,
    pixel_metrics,
    pr_curve,
    pro_curve,
    roc_curve,
)

TOL = 1e-6


# ------------------------------------------------------------------ binary cases
def _cases():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    yield "random_ties", y, np.round(rng.random(500) * 8) / 8 + 0.2 * y
    yield "heavy_ties_3_values", y, rng.integers(0, 3, 500).astype(np.float64)
    yield "all_equal", y, np.full(500, 0.7)
    yield "separated", y, y + rng.random(500) * 0.5
    yield "inverted", y, -(y + rng.random(500) * 0.5)
    yield "float32_quantised", y, (np.round(rng.normal(size=500) * 20) / 20 + y).astype(np.float32)
    yield "continuous", y, rng.normal(size=500) + 0.7 * y
    sign = 1 - 2 * (rng.random(500) < 0.1)
    yield "with_infinities", y, np.where(rng.random(500) < 0.2, np.inf, rng.random(500)) * sign
    yield "one_positive", np.eye(1, 50, 7, dtype=int)[0], rng.random(50)


CASES = list(_cases())


def _oracle(y, s):
    """sklearn on dense ranks (same order and ties; sklearn itself rejects +-inf)."""
    r = rankdata(s, method="dense")
    return roc_auc_score(y, r), average_precision_score(y, r)


@pytest.mark.parametrize("name,y,s", CASES, ids=[c[0] for c in CASES])
def test_image_metrics_match_sklearn(name, y, s):
    ref_auc, ref_ap = _oracle(y, s)
    assert abs(auroc(y, s) - ref_auc) < TOL
    assert abs(average_precision(y, s) - ref_ap) < TOL
    if np.isfinite(s).all():
        assert abs(auroc(y, s) - roc_auc_score(y, s)) < TOL
        assert abs(average_precision(y, s) - average_precision_score(y, s)) < TOL


@pytest.mark.parametrize("name,y,s", CASES, ids=[c[0] for c in CASES])
def test_pixel_path_matches_sklearn_on_float32(name, y, s):
    """The sort-key streaming path equals sklearn on the same float32 values."""
    s32 = np.asarray(s, dtype=np.float32)
    masks = y.reshape(len(y) // 10, 10, 1)
    maps = s32.reshape(masks.shape)
    got = pixel_metrics(masks, maps)
    ref_auc, ref_ap = _oracle(y, s32)
    assert abs(got["pixel_auroc"] - ref_auc) < TOL
    assert abs(got["pixel_ap"] - ref_ap) < TOL
    assert abs(got["pixel_f1max"] - f1_max(y, s32)) < TOL


def _f1max_brute(y, s):
    best = 0.0
    for t in np.unique(s):
        pred = s >= t
        tp = np.sum(pred & (y == 1))
        fp = np.sum(pred & (y == 0))
        fn = np.sum(~pred & (y == 1))
        best = max(best, 2 * tp / (2 * tp + fp + fn))
    return best


@pytest.mark.parametrize("name,y,s", CASES, ids=[c[0] for c in CASES])
def test_f1max_brute_force(name, y, s):
    assert abs(f1_max(y, s) - _f1max_brute(y, s)) < 1e-12


def test_curves_match_sklearn_points():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.random(300) * 10) / 10
    fpr, tpr, thr = roc_curve(y, s)
    sk_fpr, sk_tpr, sk_thr = sk_roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    np.testing.assert_array_equal(thr[1:], sk_thr[1:])
    prec, rec, _ = pr_curve(y, s)
    assert prec[0] == 1 and rec[0] == 0 and rec[-1] == 1
    assert abs(-np.sum(np.diff(rec[::-1]) * prec[::-1][:-1]) - average_precision(y, s)) < 1e-12


def test_undefined_metrics_are_nan():
    assert math.isnan(auroc([0, 0, 0], [1.0, 2.0, 3.0]))
    assert math.isnan(average_precision([0, 0], [1.0, 2.0]))
    assert math.isnan(auroc([1, 1], [1.0, 2.0]))
    assert average_precision([1, 1], [1.0, 2.0]) == 1.0
    r = pixel_metrics(np.zeros((2, 4, 4), bool), np.ones((2, 4, 4)))
    assert all(math.isnan(v) for v in r.values())


def test_pixel_ties_across_normal_and_anomalous_and_signed_zeros():
    """Normal pixels tied with anomalous thresholds, normal-only values between, -0.0/+0.0, inf."""
    rng = np.random.default_rng(2)
    masks = np.zeros((3, 17, 13), bool)
    masks[0, 2:9, 3:7] = True
    masks[2, 10:12, 1:12] = True
    values = np.array([-np.inf, -1.5, -0.0, 0.0, 0.25, 1.0, 3.0, np.inf], np.float32)
    maps = values[rng.integers(0, values.size, masks.shape)]
    maps[masks] = values[rng.integers(2, 7, int(masks.sum()))]  # anomalous: a subset of values
    got = pixel_metrics(masks, maps)
    y, s = masks.ravel(), maps.ravel()
    ref_auc, ref_ap = _oracle(y, s)
    assert np.unique(rankdata(s, method="dense")).size == values.size - 1  # -0.0 == 0.0
    assert abs(got["pixel_auroc"] - ref_auc) < TOL
    assert abs(got["pixel_ap"] - ref_ap) < TOL
    assert abs(got["pixel_f1max"] - _f1max_brute(y.astype(int), s)) < 1e-12
    assert abs(got["pixel_aupro"] - _aupro_reference(masks, maps)) < 1e-9


def test_pixel_metrics_larger_continuous_maps():
    """82k pixels of continuous float32 scores: sklearn for AUROC/AP, full-sort PRO curve."""
    rng = np.random.default_rng(8)
    masks = np.zeros((20, 64, 64), bool)
    for i in range(0, 20, 2):
        y0, x0 = rng.integers(0, 50, 2)
        masks[i, y0 : y0 + rng.integers(1, 14), x0 : x0 + rng.integers(1, 14)] = True
    maps = (rng.normal(size=masks.shape) + masks * 1.5).astype(np.float32)
    got = pixel_metrics(masks, maps)
    assert abs(got["pixel_auroc"] - roc_auc_score(masks.ravel(), maps.ravel())) < TOL
    assert abs(got["pixel_ap"] - average_precision_score(masks.ravel(), maps.ravel())) < TOL
    assert abs(got["pixel_f1max"] - f1_max(masks.ravel(), maps.ravel())) < 1e-12
    fpr, pro, _ = pro_curve(masks, maps)
    assert abs(got["pixel_aupro"] - _area_up_to(fpr, pro, 0.3)) < 1e-9


def test_pixel_metrics_without_normal_pixels():
    r = pixel_metrics(np.ones((2, 3, 3), bool), np.random.default_rng(0).random((2, 3, 3)))
    assert math.isnan(r["pixel_auroc"]) and math.isnan(r["pixel_aupro"])
    assert r["pixel_ap"] == 1.0 and r["pixel_f1max"] == 1.0


# ------------------------------------------------------------------ AUPRO
def _aupro_reference(masks, maps, fpr_limit=0.3, thresholds=None):
    """Plain per-threshold AUPRO (Bergmann et al.): per-region overlap computed with masks."""
    return _area_up_to(*_pro_reference_curve(masks, maps, thresholds), fpr_limit)


def _pro_reference_curve(masks, maps, thresholds=None):
    masks = masks.astype(bool)
    structure = np.ones((3, 3), bool)  # 8-connectivity
    region_values = []  # the scores of each region's pixels
    for m, a in zip(masks, maps):
        lab, n = ndimage.label(m, structure=structure)
        region_values += [a[lab == r] for r in range(1, n + 1)]
    normal_values = maps[~masks]
    if thresholds is None:
        thresholds = np.unique(maps)[::-1]
    fprs, pros = [0.0], [0.0]
    for t in thresholds:
        pros.append(np.mean([np.mean(v >= t) for v in region_values]))
        fprs.append(np.mean(normal_values >= t))
    return fprs, pros


def _area_up_to(fprs, pros, fpr_limit):
    """Trapezoid area under (fpr, pro) for fpr in [0, limit], interpolated at the limit, / limit."""
    area = 0.0
    for (x0, y0), (x1, y1) in zip(zip(fprs[:-1], pros[:-1]), zip(fprs[1:], pros[1:])):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


def _blob_masks(rng, n=6, size=40):
    """Regions of very different sizes: single pixels, small bars, a large square, diagonals."""
    masks = np.zeros((n, size, size), bool)
    masks[0, 2:30, 2:30] = True  # 784 px
    masks[0, 35, 35] = True  # 1 px
    masks[1, 5:7, 10:13] = True  # 6 px
    masks[1, 20:25, 20:22] = True
    masks[2, np.arange(10, 20), np.arange(10, 20)] = True  # diagonal: one 8-connected region
    masks[3, 0:3, 0:40] = True
    return masks  # images 4, 5 normal


@pytest.mark.parametrize("quantised", [True, False])
def test_aupro_matches_per_threshold_reference(quantised):
    rng = np.random.default_rng(3)
    masks = _blob_masks(rng)
    maps = rng.random(masks.shape) + masks * rng.random(masks.shape) * 0.8
    maps = (np.round(maps * 25) / 25 if quantised else maps).astype(np.float32)
    curve = _pro_reference_curve(masks, maps)
    ref = _area_up_to(*curve, 0.3)
    assert abs(aupro(masks, maps) - ref) < 1e-3
    assert abs(aupro(masks, maps) - ref) < 1e-9  # in fact exact at all distinct thresholds
    for limit in (0.05, 1.0):
        assert abs(aupro(masks, maps, fpr_limit=limit) - _area_up_to(*curve, limit)) < 1e-9
    fpr, pro, _ = pro_curve(masks, maps)
    np.testing.assert_allclose(fpr, curve[0], atol=1e-12)
    np.testing.assert_allclose(pro, curve[1], atol=1e-12)


def test_aupro_against_threshold_grid_reference():
    """The reference on a grid of 200 thresholds approximates the exact value to 1e-3."""
    rng = np.random.default_rng(4)
    masks = _blob_masks(rng)
    maps = (rng.random(masks.shape) + masks * 0.6).astype(np.float32)
    grid = np.quantile(maps, np.linspace(1, 0, 200))
    low_fpr = np.quantile(maps[~masks], np.linspace(1, 0.6, 400))  # dense where FPR <= 0.3
    grid = np.unique(np.concatenate([grid, low_fpr]))[::-1]
    assert abs(aupro(masks, maps) - _aupro_reference(masks, maps, thresholds=grid)) < 1e-3


def test_aupro_perfect_and_pro_curve():
    masks = _blob_masks(np.random.default_rng(0))
    maps = masks.astype(np.float32)
    assert aupro(masks, maps) == pytest.approx(1.0)
    fpr, pro, thr = pro_curve(masks, maps)
    assert fpr[0] == 0 and pro[0] == 0 and thr[0] == np.inf
    assert fpr[-1] == pytest.approx(1.0) and pro[-1] == pytest.approx(1.0)
    # a constant map: one threshold, the curve is the segment (0, 0) -> (1, 1); up to FPR 0.3
    # the area is 0.3 * 0.3 / 2, normalised by 0.3 -> 0.15
    assert aupro(masks, np.zeros(masks.shape, np.float32)) == pytest.approx(0.15)


def test_label_regions_8_connectivity_and_torch_fallback():
    masks = np.zeros((3, 8, 8), bool)
    masks[0, 1, 1] = masks[0, 2, 2] = True  # diagonal neighbours: one region
    masks[0, 6, 6] = True
    masks[1, 1, 1] = True  # same place in the next image: a different region
    ids, n = label_regions(masks)
    assert n == 3 and ids[0, 1, 1] == ids[0, 2, 2] != ids[1, 1, 1]
    rng = np.random.default_rng(5)
    rnd = rng.random((4, 24, 24)) < 0.3
    ids_s, n_s = label_regions(rnd)
    ids_t, n_t = M._label_regions_torch(rnd)
    assert n_s == n_t
    pairs = set(zip(ids_s[rnd].tolist(), ids_t[rnd].tolist()))  # same partition up to renaming
    assert len(pairs) == n_s
    assert label_regions(np.zeros((2, 3, 3), bool))[1] == 0


# ------------------------------------------------------------------ compute_metrics
def _dataset(rng, n_per_class=12, size=16):
    classes = np.repeat(["b_cls", "a_cls", "c_good_only"], n_per_class)
    labels = np.tile((np.arange(n_per_class) % 2), 3)
    labels[classes == "c_good_only"] = 0
    masks = np.zeros((labels.size, size, size), bool)
    for i in np.flatnonzero(labels):
        y0, x0 = rng.integers(0, size - 4, 2)
        masks[i, y0 : y0 + rng.integers(1, 5), x0 : x0 + rng.integers(1, 5)] = True
    maps = (rng.random(masks.shape) + masks * 0.7).astype(np.float32)
    scores = maps.reshape(len(labels), -1).max(1) + rng.normal(0, 0.1, len(labels))
    perm = rng.permutation(labels.size)  # classes interleaved
    return labels[perm], scores[perm], masks[perm], maps[perm], classes[perm]


def test_compute_metrics_per_class_and_mean():
    labels, scores, masks, maps, classes = _dataset(np.random.default_rng(6))
    df = compute_metrics(labels, scores, masks, maps, classes)
    assert list(df.columns) == list(METRIC_NAMES)
    assert list(df.index) == ["a_cls", "b_cls", "c_good_only", "mean"]
    for c in ("a_cls", "b_cls"):
        sel = classes == c
        im = image_metrics(labels[sel], scores[sel])
        px = pixel_metrics(masks[sel], maps[sel])
        ref_img = roc_auc_score(labels[sel], scores[sel])
        ref_px = roc_auc_score(masks[sel].ravel(), maps[sel].ravel())
        assert df.loc[c, "image_auroc"] == pytest.approx(ref_img, abs=TOL)
        assert df.loc[c, "pixel_auroc"] == pytest.approx(ref_px, abs=TOL)
        for k, v in {**im, **px}.items():
            assert df.loc[c, k] == pytest.approx(v, abs=1e-12)
    assert df.loc["c_good_only"].isna().all()  # no anomalies: everything undefined
    serial = compute_metrics(labels, scores, masks, maps, classes, n_jobs=1)
    assert serial.equals(df)
    for k in METRIC_NAMES:  # mean skips the undefined class
        assert df.loc["mean", k] == pytest.approx(df.loc[["a_cls", "b_cls"], k].mean())


def test_compute_metrics_image_only_and_single_class():
    labels, scores, masks, maps, classes = _dataset(np.random.default_rng(7))
    df = compute_metrics(labels, scores, class_names=classes, pixel=False)
    assert df[list(METRIC_NAMES[3:])].isna().all().all()
    assert df["image_auroc"].notna().sum() == 3  # a, b, mean
    one = compute_metrics(labels, scores, masks[:, None], maps[:, None])  # (N,1,H,W) accepted
    assert list(one.index) == ["all", "mean"]
    ref_ap = average_precision_score(masks.ravel(), maps.ravel())
    assert one.loc["all", "pixel_ap"] == pytest.approx(ref_ap, abs=TOL)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(scores=np.zeros(5)), "scores has 5 entries but labels has 4"),
        (dict(maps=np.zeros((4, 8, 9))), r"masks shape \(4, 8, 8\) does not match maps shape"),
        (dict(maps=np.zeros((3, 8, 8)), masks=np.zeros((3, 8, 8))), r"maps must be \(4, H, W\)"),
        (dict(labels=np.array([0, 1, 2, 1])), "only 0 and 1"),
        (dict(class_names=np.array(["a", "b"])), r"class_names must have shape \(4,\)"),
        (dict(class_names=np.array(["a", "mean", "a", "a"])), "reserved"),
        (dict(masks=None), "pixel=False"),
        (dict(maps=np.full((4, 8, 8), np.nan)), "NaN"),
        (dict(scores=np.array([0.1, np.nan, 0.2, 0.3])), "NaN"),
    ],
)
def test_compute_metrics_errors(kwargs, match):
    args = dict(
        labels=np.array([0, 1, 0, 1]),
        scores=np.arange(4.0),
        masks=np.zeros((4, 8, 8), bool),
        maps=np.zeros((4, 8, 8)),
        class_names=np.array(["a"] * 4),
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        compute_metrics(**args)


def test_core_does_not_import_kedro_or_mlflow():
    import ast
    from pathlib import Path

    for path in Path(M.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n.split(".")[0] in ("kedro", "mlflow") for n in names), (path, names)
