"""Layout adapters on tiny fake trees, and auto-detection."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from uad.data.index import INDEX_COLUMNS, validate_index
from uad.data.layouts import detect_layout, scan_dataset
from uad.errors import DatasetLayoutError


def _img(path, mask=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    if mask:
        a = np.zeros((8, 8), np.uint8)
        a[2:5, 2:5] = 255
        Image.fromarray(a).save(path)
    else:
        Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(path)


def _mvtec(root, classes=("bottle", "carpet")):
    for c in classes:
        for i in range(2):
            _img(root / c / "train" / "good" / f"{i:03d}.png")
        _img(root / c / "test" / "good" / "000.png")
        _img(root / c / "test" / "crack" / "000.png")
        _img(root / c / "ground_truth" / "crack" / "000_mask.png", mask=True)
        (root / c / "license.txt").parent.mkdir(parents=True, exist_ok=True)
        (root / c / "license.txt").write_text("ignored")
    (root / "readme.txt").write_text("ignored")


def test_mvtec(tmp_path):
    root = tmp_path / "mvtec"
    _mvtec(root)
    df = scan_dataset(root, layout="mvtec")
    assert list(df.columns) == INDEX_COLUMNS
    assert len(df) == 8 and set(df["dataset"]) == {"mvtec"}
    bad = df[df.label == 1]
    assert (bad["defect_type"] == "crack").all()
    assert all(m.endswith("ground_truth/crack/000_mask.png") for m in bad["mask_path"])
    assert (df[df.label == 0]["mask_path"] == "").all()
    validate_index(df)
    # deterministic and sorted; class filter; custom name; mpdd alias
    assert scan_dataset(root, layout="auto").equals(df)
    one = scan_dataset(root, layout="mpdd", classes=["carpet"], dataset_name="mpdd")
    assert set(one["class_name"]) == {"carpet"} and set(one["dataset"]) == {"mpdd"}
    with pytest.raises(ValueError, match="nope"):
        scan_dataset(root, classes=["nope"])


def test_btad_mask_other_extension(tmp_path):
    root = tmp_path / "btad"
    _img(root / "01" / "train" / "ok" / "0000.bmp")
    _img(root / "01" / "test" / "ok" / "0001.bmp")
    _img(root / "01" / "test" / "ko" / "0002.BMP")
    _img(root / "01" / "ground_truth" / "ko" / "0002.png", mask=True)
    assert detect_layout(root) == "btad"
    df = scan_dataset(root)
    assert df[["split", "label", "defect_type"]].values.tolist() == [
        ["test", 0, "good"], ["test", 1, "ko"], ["train", 0, "good"]]
    assert df.loc[df.label == 1, "mask_path"].iloc[0].endswith("ground_truth/ko/0002.png")
    validate_index(df)


def test_mvtec3d(tmp_path):
    root = tmp_path / "m3d"
    c = root / "bagel"
    _img(c / "train" / "good" / "rgb" / "000.png")
    (c / "train" / "good" / "xyz").mkdir(parents=True)
    _img(c / "validation" / "good" / "rgb" / "000.png")
    _img(c / "test" / "good" / "rgb" / "000.png")
    _img(c / "test" / "good" / "gt" / "000.png")
    _img(c / "test" / "hole" / "rgb" / "000.png")
    _img(c / "test" / "hole" / "gt" / "000.png", mask=True)
    assert detect_layout(root) == "mvtec3d"
    df = scan_dataset(root)
    assert len(df) == 3 and (df.split == "train").sum() == 1
    assert df.loc[df.label == 1, "mask_path"].iloc[0].endswith("hole/gt/000.png")
    assert (df.loc[df.label == 0, "mask_path"] == "").all()
    assert (scan_dataset(root, include_validation=True).split == "train").sum() == 2
    validate_index(df)


def test_visa(tmp_path):
    root = tmp_path / "visa"
    for rel in ["candle/Data/Images/Normal/0000.JPG", "candle/Data/Images/Normal/0001.JPG",
                "candle/Data/Images/Anomaly/000.JPG"]:
        _img(root / rel)
    _img(root / "candle/Data/Masks/Anomaly/000.png", mask=True)
    (root / "split_csv").mkdir()
    (root / "split_csv" / "1cls.csv").write_text(
        "object,split,label,image,mask\n"
        "candle,train,normal,candle/Data/Images/Normal/0000.JPG,\n"
        "candle,test,normal,candle/Data/Images/Normal/0001.JPG,\n"
        "candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png\n"
    )
    assert detect_layout(root) == "visa"
    df = scan_dataset(root)
    assert df[["split", "label", "defect_type"]].values.tolist() == [
        ["test", 0, "good"], ["test", 1, "anomaly"], ["train", 0, "good"]]
    assert df.loc[1, "mask_path"].endswith("Masks/Anomaly/000.png") and df.loc[0, "mask_path"] == ""
    validate_index(df)


def test_realiad(tmp_path):
    root = tmp_path / "realiad"
    base = root / "realiad_1024" / "audiojack"
    _img(base / "OK/S0001/a_0001_OK_C1.jpg")
    _img(base / "OK/S0002/a_0002_OK_C1.jpg")
    _img(base / "NG/HS/S0003/a_0003_NG_HS_C1.jpg")
    _img(base / "NG/HS/S0003/a_0003_NG_HS_C1.png", mask=True)
    spec = {
        "meta": {"prefix": "", "normal_class": "OK"},
        "train": [{"category": "audiojack", "anomaly_class": "OK", "image_path": "OK/S0001/a_0001_OK_C1.jpg",
                   "mask_path": None}],
        "test": [{"category": "audiojack", "anomaly_class": "OK", "image_path": "OK/S0002/a_0002_OK_C1.jpg",
                  "mask_path": None},
                 {"category": "audiojack", "anomaly_class": "HS",
                  "image_path": "NG/HS/S0003/a_0003_NG_HS_C1.jpg", "mask_path": "NG/HS/S0003/a_0003_NG_HS_C1.png"}],
    }
    (root / "realiad_jsons").mkdir(parents=True)
    (root / "realiad_jsons" / "audiojack.json").write_text(json.dumps(spec))
    assert detect_layout(root) == "realiad"
    df = scan_dataset(root)
    assert df[["split", "label", "defect_type"]].values.tolist() == [
        ["test", 0, "good"], ["test", 1, "HS"], ["train", 0, "good"]]
    validate_index(df)
    # another json folder (e.g. the single-view variant) via json_dir
    (root / "jsons_sv").mkdir()
    (root / "jsons_sv" / "audiojack.json").write_text(json.dumps({**spec, "test": spec["test"][:1]}))
    assert len(scan_dataset(root, layout="realiad", json_dir=root / "jsons_sv")) == 2


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        scan_dataset(tmp_path / "does-not-exist")
    (tmp_path / "weird" / "x").mkdir(parents=True)
    with pytest.raises(ValueError, match="unknown layout at .*weird.*expected one of"):
        scan_dataset(tmp_path / "weird")
    with pytest.raises(ValueError, match="unknown layout 'foo'"):
        scan_dataset(tmp_path / "weird", layout="foo")


@pytest.mark.parametrize("entry", ["../outside.png", "/etc/passwd", "candle/../../outside.png"])
def test_split_file_entries_outside_the_root_are_refused(tmp_path, entry):
    """A crafted VisA split file (or Real-IAD json) cannot make ingest read files outside the root."""
    root = tmp_path / "visa"
    _img(root / "candle/Data/Images/Normal/0000.JPG")
    _img(tmp_path / "outside.png")
    (root / "split_csv").mkdir()
    (root / "split_csv" / "1cls.csv").write_text(
        "object,split,label,image,mask\n"
        "candle,train,normal,candle/Data/Images/Normal/0000.JPG,\n"
        f"candle,test,normal,{entry},\n")
    with pytest.raises(DatasetLayoutError, match="outside the dataset root") as err:
        scan_dataset(root, "visa")
    assert "1cls.csv" in str(err.value) and entry in str(err.value)
    spec = {"train": [{"category": "c", "anomaly_class": "OK", "image_path": entry, "mask_path": None}], "test": []}
    rroot = tmp_path / "realiad"
    (rroot / "realiad_jsons").mkdir(parents=True)
    (rroot / "realiad_1024" / "c").mkdir(parents=True)
    (rroot / "realiad_jsons" / "c.json").write_text(json.dumps(spec))
    with pytest.raises(DatasetLayoutError, match="outside the dataset root"):
        scan_dataset(rroot, "realiad")
