"""Thin Kedro nodes, called directly: semi-supervised synthesis hook, metric naming, settings."""

from __future__ import annotations

import numpy as np
import pytest
import pandas as pd

from uad.data.layouts import scan_dataset
from uad.data.semi import hold_out_labelled_anomalies
from uad.data.settings import make_split
from uad.framework.pipelines.method.nodes import evaluate
from uad.synthesis.spec import build_augment


def _split(root):
    index = scan_dataset(root, "mvtec")
    return make_split(index, None, setting="multi_class")


def test_semi_supervised_hook_pastes_real_anomalies(synthetic_root):
    train, test, _ = _split(synthetic_root)
    train, test, held = hold_out_labelled_anomalies(train, test, k=1, seed=0)
    assert sum(len(v) for v in held.values()) == 4
    normal, labelled = train[train["label"] == 0], train[train["label"] == 1]
    synth = {"texture_source": "procedural", "semi_supervised_weight": 1.0, "config": {"anomaly_probability": 1.0}}
    aug, tags = build_augment(normal.reset_index(drop=True), labelled, synth, seed=3, crop=112, resize=128)
    assert tags["semi_supervised_anomalies"] == "4"
    img = np.full((112, 112, 3), 127, np.uint8)
    out, mask, label = aug(img, 0)
    assert label == 1 and mask.any()
    assert np.array_equal(out[~mask], img[~mask]), "pixels outside the pasted mask changed"
    again, mask2, _ = aug(img, 0)
    assert np.array_equal(again, out) and np.array_equal(mask2, mask), "not deterministic under the seed"


def test_semi_supervised_refuses_to_empty_the_test_set(synthetic_root):
    train, test, _ = _split(synthetic_root)
    try:
        hold_out_labelled_anomalies(train, test, k=10_000, seed=0)
    except ValueError as err:
        assert "cannot hold out" in str(err)
    else:
        raise AssertionError("expected a ValueError")


def test_evaluate_names_metrics_as_the_papers_and_per_class():
    rng = np.random.default_rng(0)
    n, h = 12, 16
    labels = np.array([0, 1] * 6)
    masks = np.zeros((n, h, h), np.uint8)
    masks[labels == 1, 4:8, 4:8] = 1
    maps = rng.random((n, h, h)).astype(np.float16) + masks
    preds = {"labels": labels, "scores": maps.reshape(n, -1).max(1).astype(np.float32), "masks": masks, "maps": maps,
             "class_names": np.array(["a"] * 6 + ["b"] * 6)}
    table, logged, thresholds = evaluate(preds, {"pixel": True})
    assert list(table["class_name"]) == ["a", "b", "mean"]
    assert {"image_auroc", "pixel_aupro", "a/image_auroc", "b/pixel_f1max"} <= set(logged)
    assert logged["image_auroc"]["value"] == table.set_index("class_name").loc["mean", "image_auroc"]
    assert all(v["step"] == 0 for v in logged.values())
    # the stored decision thresholds reach the F1-max of this labelled split
    from uad.metrics import f1_max

    def f1(y, pred):
        tp = int((y & pred).sum())
        return 2 * tp / (2 * tp + int((~y & pred).sum()) + int((y & ~pred).sum()))

    assert thresholds["image_source"] == "f1_test" and thresholds["pixel_source"] == "f1_test"
    y = labels.astype(bool)
    assert f1(y, preds["scores"] >= thresholds["image"]) == pytest.approx(f1_max(labels, preds["scores"]))
    m = masks.astype(bool).ravel()
    assert f1(m, maps.astype(np.float32).ravel() >= thresholds["pixel"]) == pytest.approx(f1_max(m, maps.ravel()), abs=1e-6)
    assert logged["threshold_image"]["value"] == thresholds["image"]


@pytest.mark.parametrize("fpr", [0.0, 0.05, 0.25])
def test_thresholds_without_anomalies_hold_the_false_positive_rate(fpr):
    from uad.metrics.thresholds import compute_thresholds

    scores = np.random.default_rng(1).random(200)
    scores[:10] = scores[10]  # ties
    t = compute_thresholds(np.zeros(200, int), scores, fpr=fpr)
    assert t["image_source"] == "fpr_normal" and t["fpr"] == fpr
    flagged = (scores >= t["image"]).mean()
    assert flagged <= fpr and flagged >= fpr - 0.06  # at most fpr; ties may cost a few


def test_per_class_few_shot_trains_one_model_per_class():
    """``data.per_class: true`` in the few_shot setting: one model per class (Table 9's protocol);
    elsewhere it is refused with the fix in the message."""
    import pandas as pd
    import pytest

    from uad.engine.orchestration import model_groups as _groups, per_class_models

    df = pd.DataFrame({"class_name": ["b", "a", "b"]})
    assert _groups(df, {"setting": "few_shot", "per_class": True}) == ["a", "b"]
    assert _groups(df, {"setting": "few_shot"}) == [None]
    assert _groups(df, {"setting": "one_class"}) == ["a", "b"]
    assert per_class_models({"setting": "few_shot", "per_class": True}) and not per_class_models({"setting": "few_shot"})
    with pytest.raises(ValueError, match="data.setting=few_shot"):
        _groups(df, {"setting": "multi_class", "per_class": True})
