"""Image and mask reading: every PIL mode converted the documented way, clear errors."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from PIL import Image

from uad.data.images import ImageReadError, image_size, load_image, load_mask, read_mask_values


def test_rgb_and_gray(tmp_path):
    rgb = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    assert np.array_equal(load_image(tmp_path / "rgb.png"), rgb)
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(gray).save(tmp_path / "g.png")
    out = load_image(tmp_path / "g.png")
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    assert np.array_equal(out, np.repeat(gray[..., None], 3, axis=2))


def test_16bit_scaled_by_257(tmp_path):
    a = np.array([[0, 257, 65535, 128], [256, 1000, 30000, 65534]], dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")
    out = load_image(tmp_path / "g16.png")
    assert np.array_equal(out[..., 0], np.round(a / 257.0).astype(np.uint8))
    assert (out[..., 0] == out[..., 2]).all()
    Image.fromarray(a.astype(np.int32)).save(tmp_path / "g32.tif")
    assert np.array_equal(load_image(tmp_path / "g32.tif"), out)


def test_rgba_composited_over_black_and_palette(tmp_path):
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3] = [200, 100, 50]
    rgba[..., 3] = [[255, 0], [128, 51]]
    Image.fromarray(rgba).save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png").astype(int)
    assert out[0, 0].tolist() == [200, 100, 50]
    assert out[0, 1].tolist() == [0, 0, 0]
    assert out[1, 0].tolist() == [100, 50, 25]
    assert out[1, 1].tolist() == [40, 20, 10]
    la = Image.fromarray(np.stack([np.full((2, 2), 200, np.uint8), rgba[..., 3]], -1))
    la.save(tmp_path / "la.png")
    assert load_image(tmp_path / "la.png")[1, 0].tolist() == [100, 100, 100]
    p = Image.new("P", (2, 2))
    p.putdata([0, 1, 1, 0])
    p.putpalette([10, 20, 30, 250, 240, 230] + [0] * 762)
    p.save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.png")[0, 1].tolist() == [250, 240, 230]
    Image.fromarray(rgba[..., :3].copy()).convert("CMYK").save(tmp_path / "c.jpg")
    assert load_image(tmp_path / "c.jpg").shape == (2, 2, 3)


def test_masks(tmp_path):
    m = np.zeros((4, 5), np.uint8)
    m[1:3, 2:4] = 255
    Image.fromarray(m).save(tmp_path / "m.png")
    out = load_mask(tmp_path / "m.png")
    assert out.dtype == np.bool_ and out.shape == (4, 5) and out.sum() == 4
    rgb = np.stack([m, m, m], -1)
    Image.fromarray(rgb).save(tmp_path / "m_rgb.png")
    assert np.array_equal(load_mask(tmp_path / "m_rgb.png"), out)
    assert set(np.unique(read_mask_values(tmp_path / "m.png"))) == {0, 255}
    assert image_size(tmp_path / "m.png") == (5, 4)


def test_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ImageReadError, match="bad.png") as ei:
        load_image(bad)
    assert isinstance(ei.value, ValueError) and ei.value.path == str(bad)
    with pytest.raises(ImageReadError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    # truncated PNG: header is fine, decoding fails
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    assert image_size(tmp_path / "t.png") == (32, 32)
    with pytest.raises(ImageReadError, match="t.png"):
        load_image(tmp_path / "t.png")
    err = pickle.loads(pickle.dumps(ImageReadError("x.png", "boom")))
    assert err.path == "x.png" and err.reason == "boom"
