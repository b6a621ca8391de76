"""Catalog datasets: versioned, atomic, pickle-free."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kedro.io.core import DatasetError, Version

from uad.framework.io import NpzDataset, PngDataset, SafetensorsDataset

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16


def test_versions_are_never_overwritten_and_each_reloads(tmp_path):
    path = str(tmp_path / "m.safetensors")
    SafetensorsDataset(path, version=Version(None, "2026-01-01T00.00.00.000Z")).save(
        {"tensors": {"w": torch.zeros(2)}, "meta": {"v": 1}})
    SafetensorsDataset(path, version=Version(None, "2026-01-02T00.00.00.000Z")).save(
        {"tensors": {"w": torch.ones(2)}, "meta": {"v": 2}})
    first = SafetensorsDataset(path, version=Version("2026-01-01T00.00.00.000Z", None)).load()
    latest = SafetensorsDataset(path, version=Version(None, None)).load()
    assert first["meta"] == {"v": 1} and torch.equal(first["tensors"]["w"], torch.zeros(2))
    assert latest["meta"] == {"v": 2}


def test_a_run_reads_its_own_output_even_when_another_run_saved_a_newer_one(tmp_path):
    """Two runs in one project: the one that started first (older save version) must evaluate its
    own predictions, not the newer ones another run wrote meanwhile."""
    path = str(tmp_path / "p.npz")
    mine = NpzDataset(path, version=Version(None, "2026-01-01T00.00.00.000Z"))
    mine.save({"scores": np.zeros(2)})
    NpzDataset(path, version=Version(None, "2026-01-02T00.00.00.000Z")).save({"scores": np.ones(2)})
    assert np.array_equal(mine.load()["scores"], np.zeros(2))
    assert np.array_equal(NpzDataset(path, version=Version(None, None)).load()["scores"], np.ones(2))  # latest
    pinned = NpzDataset(path, version=Version("2026-01-01T00.00.00.000Z", "2026-01-03T00.00.00.000Z"))
    assert np.array_equal(pinned.load()["scores"], np.zeros(2))  # --load-versions wins


def test_npz_round_trip_and_refuses_pickled_objects(tmp_path):
    ds = NpzDataset(str(tmp_path / "p.npz"), compress=True)
    ds.save({"maps": np.ones((2, 4, 4), np.float16), "class_names": np.array(["a", "b"])})
    out = ds.load()
    assert out["maps"].dtype == np.float16 and list(out["class_names"]) == ["a", "b"]
    with pytest.raises(DatasetError, match="pickle"):
        ds.save({"bad": np.array([{"x": 1}], dtype=object)})


def test_png_dataset_checks_its_input_and_previews_in_viz(tmp_path):
    ds = PngDataset(str(tmp_path / "x.png"))
    with pytest.raises(DatasetError, match="PNG"):
        ds.save(b"GIF89a")
    ds.save(PNG)
    assert ds.load() == PNG
    import base64

    assert base64.b64decode(ds.preview()) == PNG
