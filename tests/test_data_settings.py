"""Experimental settings: multi/one-class, few-shot determinism and recording, zero-shot."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from uad.data.index import INDEX_COLUMNS
from uad.data.settings import SETTINGS, iter_groups, make_split


def _fake_index(dataset="A", classes=("c1", "c2"), n_train=6):
    rows = []
    for c in classes:
        for i in range(n_train):
            rows.append((dataset, c, "train", 0, "good", f"/{dataset}/{c}/train/{i:03d}.png", ""))
        rows.append((dataset, c, "test", 0, "good", f"/{dataset}/{c}/test/good/000.png", ""))
        rows.append((dataset, c, "test", 1, "crack", f"/{dataset}/{c}/test/crack/000.png", f"/{dataset}/{c}/gt/000.png"))
    return pd.DataFrame(rows, columns=INDEX_COLUMNS)


def test_multi_and_one_class():
    df = _fake_index()
    tr, te, info = make_split(df, setting="multi_class")
    assert len(tr) == 12 and len(te) == 4 and (tr.split == "train").all() and (te.split == "test").all()
    assert info["classes"] == ["c1", "c2"] and "groups" not in info
    tr1, te1, info1 = make_split(df, setting="one_class")
    assert tr1.equals(tr) and te1.equals(te) and info1["groups"] == ["c1", "c2"]
    groups = list(iter_groups(tr1, te1, info1))
    assert [g for g, _, _ in groups] == ["c1", "c2"] and all(len(a) == 6 and len(b) == 2 for _, a, b in groups)
    tr2, te2, info2 = make_split(df, setting="multi_class", classes=["c2"])
    assert set(tr2.class_name) == set(te2.class_name) == {"c2"}
    json.dumps(info2)


def test_few_shot_deterministic_and_recorded():
    df = _fake_index()
    tr, te, info = make_split(df, setting="few_shot", shots=2, seed=5)
    assert len(tr) == 4 and len(te) == 4 and info["shots"] == 2
    choice = info["few_shot_choice"]
    assert set(choice) == {"c1", "c2"} and all(len(v) == 2 for v in choice.values())
    assert sorted(tr.image_path) == sorted(choice["c1"] + choice["c2"])
    tr_again, _, info_again = make_split(df.sample(frac=1, random_state=1), setting="few_shot", shots=2, seed=5)
    assert info_again == info and tr_again.equals(tr)  # row order of the source does not matter
    # a class's choice does not depend on which other classes are selected
    _, _, only = make_split(df, setting="few_shot", shots=2, seed=5, classes=["c2"])
    assert only["few_shot_choice"]["c2"] == choice["c2"]
    others = {tuple(make_split(df, setting="few_shot", shots=2, seed=s)[2]["few_shot_choice"]["c1"]) for s in range(6)}
    assert len(others) > 1
    json.dumps(info)
    with pytest.raises(ValueError, match="shots"):
        make_split(df, setting="few_shot")
    with pytest.raises(ValueError, match="< shots=7"):
        make_split(df, setting="few_shot", shots=7)


def test_zero_shot():
    a, b = _fake_index("A"), _fake_index("B", classes=("x", "y"))
    tr, te, info = make_split(a, b, setting="zero_shot", classes=["y"])
    assert set(tr.dataset) == {"A"} and (tr.split == "train").all() and len(tr) == 12
    assert set(te.dataset) == {"B"} and set(te.class_name) == {"y"} and (te.split == "test").all()
    assert info["train_dataset"] == "A" and info["test_dataset"] == "B"
    json.dumps(info)
    with pytest.raises(ValueError, match="test_source_df"):
        make_split(a, setting="zero_shot")


def test_unknown_setting_and_class():
    df = _fake_index()
    with pytest.raises(ValueError, match=r"data.setting: .semi. is not one of") as ei:
        make_split(df, setting="semi")
    assert all(s in str(ei.value) for s in SETTINGS)
    with pytest.raises(ValueError, match="nope"):
        make_split(df, classes=["nope"])
