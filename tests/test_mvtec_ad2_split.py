"""The validation split: held-out normals no method trains on (MVTec AD 2's validation/good, else
data.validation_fraction of each class's training normals), and the thresholds read from them."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from uad.data.index import INDEX_COLUMNS, DatasetValidationError, validate_index
from uad.data.settings import hold_out_validation, validation_rows
from uad.errors import ConfigError
from uad.framework.pipelines.ingest.nodes import split_for_setting
from uad.metrics.thresholds import compute_thresholds, normal_threshold


def _index(n_train=10, classes=("a", "b"), validation=()):
    rows = []
    for c in classes:
        rows += [("ds", c, "train", 0, "good", f"/d/{c}/train/{i:03d}.png", "") for i in range(n_train)]
        rows += [("ds", c, "test", 0, "good", f"/d/{c}/test/good/{i}.png", "") for i in range(2)]
        rows += [("ds", c, "test", 1, "crack", f"/d/{c}/test/crack/{i}.png", f"/d/{c}/gt/{i}.png") for i in range(2)]
        if c in validation:
            rows += [("ds", c, "validation", 0, "good", f"/d/{c}/validation/good/{i}.png", "") for i in range(3)]
    return pd.DataFrame(rows, columns=INDEX_COLUMNS)


def test_fraction_zero_holds_out_nothing_and_keeps_today():
    idx = _index()
    out, counts = hold_out_validation(idx, 0, seed=0)
    assert counts == {} and out.equals(idx)
    train, val, test, info = split_for_setting(idx, {"train": {"name": "ds", "root": "/d"}})
    assert len(val) == 0 and list(val.columns) == INDEX_COLUMNS
    assert len(train) == 20 and info["n_validation"] == 0


def test_fraction_is_seeded_per_class_bounded_and_disjoint():
    idx = _index(n_train=10)
    out, counts = hold_out_validation(idx, 0.25, seed=3)
    assert counts == {"ds/a": 2, "ds/b": 2}  # round(0.25 * 10) = 2 (banker's rounding of 2.5)
    again, _ = hold_out_validation(idx.sample(frac=1, random_state=0), 0.25, seed=3)
    assert sorted(out.loc[out.split == "validation", "image_path"]) == sorted(again.loc[again.split == "validation", "image_path"])
    other, _ = hold_out_validation(idx, 0.25, seed=4)
    assert set(out.loc[out.split == "validation", "image_path"]) != set(other.loc[other.split == "validation", "image_path"])
    only_a, _ = hold_out_validation(idx[idx.class_name == "a"], 0.25, seed=3)  # per-class stream
    assert (set(only_a.loc[only_a.split == "validation", "image_path"])
            == set(out.loc[(out.split == "validation") & (out.class_name == "a"), "image_path"]))
    tiny, counts = hold_out_validation(_index(n_train=2), 0.01, seed=0)
    assert counts == {"ds/a": 1, "ds/b": 1}  # at least one held out ...
    _, counts = hold_out_validation(_index(n_train=2), 0.9, seed=0)
    assert counts == {"ds/a": 1, "ds/b": 1}  # ... and at least one kept for training
    with pytest.raises(ConfigError, match="data.validation_fraction"):
        hold_out_validation(_index(n_train=1), 0.5)
    with pytest.raises(ConfigError, match="data.validation_fraction"):
        hold_out_validation(idx, 1.5)


def test_train_index_holds_only_rows_trained_on():
    idx = _index(n_train=10)
    data = {"train": {"name": "ds", "root": "/d"}, "validation_fraction": 0.2, "seed": 1}
    train, val, test, info = split_for_setting(idx, data)
    assert len(val) == 4 and (val.label == 0).all() and (val.split == "validation").all()
    assert not set(val.image_path) & set(train.image_path)
    assert not set(val.image_path) & set(test.image_path)
    assert len(train) == 16 and info["validation"]["images"] == {"ds/a": 2, "ds/b": 2}
    # few-shot draws its shots from what is left, never from the validation normals
    train_fs, val_fs, _, _ = split_for_setting(idx, {**data, "setting": "few_shot", "shots": 2})
    assert len(train_fs) == 4 and not set(val_fs.image_path) & set(train_fs.image_path)
    # the classes filter applies to the validation split too
    _, val_a, _, _ = split_for_setting(idx, {**data, "classes": ["a"]})
    assert set(val_a.class_name) == {"a"}


def test_layout_validation_wins_over_the_fraction():
    idx = _index(n_train=10, validation=("a",))
    train, val, _, info = split_for_setting(idx, {"train": {"name": "ds", "root": "/d"}, "validation_fraction": 0.2})
    assert sorted(val[val.class_name == "a"].image_path) == [f"/d/a/validation/good/{i}.png" for i in range(3)]
    assert (train.class_name == "a").sum() == 10 and (val.class_name == "b").sum() == 2
    train0, val0, _, _ = split_for_setting(idx, {"train": {"name": "ds", "root": "/d"}})
    assert len(val0) == 3 and len(train0) == 20
    assert validation_rows(idx, classes=["b"]).empty


def test_validation_rows_must_be_normal():
    idx = _index(validation=("a",))
    idx.loc[idx.split == "validation", ["label", "defect_type"]] = [1, "crack"]
    with pytest.raises(DatasetValidationError, match="validation split"):
        validate_index(idx, check_images=False)


def test_thresholds_come_from_validation_normals_not_the_test_split():
    labels = np.array([0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.8, 0.9])
    val = np.array([1.0, 2.0, 3.0, 4.0])
    masks = np.zeros((4, 2, 2), bool)
    masks[2:, 0, 0] = True
    maps = np.random.default_rng(0).random((4, 2, 2))
    vmaps = np.arange(16, dtype=np.float64).reshape(4, 2, 2)
    t = compute_thresholds(labels, scores, masks, maps, validation_scores=val, validation_maps=vmaps,
                           rule="mean_std", k=3)
    # hand-computed: mean 2.5, population std sqrt(1.25); pixels 0..15: mean 7.5, std sqrt(21.25)
    assert t["image"] == pytest.approx(2.5 + 3 * np.sqrt(1.25))
    assert t["pixel"] == pytest.approx(7.5 + 3 * np.sqrt(21.25))
    assert t["image_source"] == t["pixel_source"] == "validation_mean_std"
    t = compute_thresholds(labels, scores, masks, maps, validation_scores=val, validation_maps=vmaps, rule="fpr", fpr=0.25)
    assert t["image"] == 4.0 and t["pixel"] == 12.0  # one of four (four of sixteen) flagged at >= t
    # the test split's F1-optimal threshold is another number: a test-split rule would fail here
    test_rule = compute_thresholds(labels, scores, masks, maps)
    assert test_rule["image_source"] == "f1_test" and test_rule["image"] != t["image"]
    with pytest.raises(ConfigError, match="evaluation.threshold_rule"):
        normal_threshold(val, rule="median")
