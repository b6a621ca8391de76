"""The embedded synthetic dataset: layout, determinism, caching, masks."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from uad.data.images import read_mask_values
from uad.data.layouts import scan_dataset
from uad.data.index import validate_index
from uad.data.synthetic import (
    MARKER_NAME,
    SYNTHETIC_CLASSES,
    SYNTHETIC_DEFECTS,
    ensure_synthetic_dataset,
    render_sample,
)

SMALL = dict(image_size=48, n_train=2, n_test_good=1, n_test_bad_per_defect=1)


def _hashes(root):
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*.png"))
    }


def test_layout_counts_and_masks(tmp_path):
    root = ensure_synthetic_dataset(tmp_path / "syn", seed=0, **SMALL)
    assert len(SYNTHETIC_CLASSES) >= 4
    for cls in SYNTHETIC_CLASSES:
        assert len(list((root / cls / "train" / "good").glob("*.png"))) == 2
        assert len(list((root / cls / "test" / "good").glob("*.png"))) == 1
        for d in SYNTHETIC_DEFECTS[cls]:
            imgs = sorted((root / cls / "test" / d).glob("*.png"))
            assert len(imgs) == 1
            m = read_mask_values(root / cls / "ground_truth" / d / f"{imgs[0].stem}_mask.png")
            assert m.shape == (48, 48) and set(np.unique(m)) <= {0, 255} and (m == 255).any()
            with Image.open(imgs[0]) as im:
                assert im.mode == "RGB" and im.size == (48, 48)
    df = scan_dataset(root, layout="auto")
    validate_index(df, full_decode=True)
    assert set(df["class_name"]) == set(SYNTHETIC_CLASSES)


def test_deterministic_and_cached(tmp_path):
    a = ensure_synthetic_dataset(tmp_path / "a", seed=3, **SMALL)
    b = ensure_synthetic_dataset(tmp_path / "b", seed=3, **SMALL)
    ha, hb = _hashes(a), _hashes(b)
    assert ha == hb and len(ha) > 0
    marker = a / MARKER_NAME
    before = {p: p.stat().st_mtime_ns for p in a.rglob("*")}
    assert ensure_synthetic_dataset(tmp_path / "a", seed=3, **SMALL) == a
    assert {p: p.stat().st_mtime_ns for p in a.rglob("*")} == before  # nothing rewritten
    assert json.loads(marker.read_text())["params"]["seed"] == 3
    # another seed gives other images; changed parameters regenerate in place
    c = ensure_synthetic_dataset(tmp_path / "a", seed=4, **SMALL)
    assert c == a and _hashes(c) != ha
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_refuses_foreign_folder(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.txt").write_text("x")
    with pytest.raises(FileExistsError, match="refusing"):
        ensure_synthetic_dataset(tmp_path / "data", **SMALL)


def test_render_sample_normal_vs_defect():
    for cls in SYNTHETIC_CLASSES:
        img, mask = render_sample(cls, None, seed=0, index=0, image_size=64)
        assert img.dtype == np.uint8 and img.shape == (64, 64, 3) and not mask.any()
        for d in SYNTHETIC_DEFECTS[cls]:
            img_d, mask_d = render_sample(cls, d, seed=0, index=0, image_size=64)
            assert mask_d.any() and mask_d.mean() < 0.2
        # same arguments -> same pixels
        assert np.array_equal(img, render_sample(cls, None, seed=0, index=0, image_size=64)[0])
