"""Using a trained model: the folder scan (bad files reported and skipped), decision overlays, and
the ONNX export of the whole inference path equal to torch (INP-Former++ here; Dinomaly through
the Kedro export pipeline in test_kedro_runs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from uad.data.folder import scan_image_folder
from uad.errors import DatasetRootError


def _png(path, seed=0, size=40):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)


def test_scan_finds_nested_images_pairs_masks_and_flags_bad_files(tmp_path):
    root, masks = tmp_path / "imgs", tmp_path / "masks"
    _png(root / "line1" / "a.png")
    _png(root / "line1" / "deep" / "b.JPG", 1)
    _png(root / "c.bmp", 2)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "notes.txt").write_text("ignored")
    (masks / "line1").mkdir(parents=True)
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(masks / "line1" / "a_mask.png")
    df = scan_image_folder(root, masks)
    assert sorted(df["relative_path"]) == ["broken.png", "c.bmp", "line1/a.png", "line1/deep/b.JPG"]
    row = df.set_index("relative_path")
    assert row.loc["line1/a.png", "mask_path"].endswith("a_mask.png") and row.loc["c.bmp", "mask_path"] == ""
    # decoded once, when scored: the unreadable file becomes a flagged sample, not an error
    from uad.data.torch_data import AnomalyImageDataset, SkipUnreadable

    ds = SkipUnreadable(AnomalyImageDataset(df, 32, 32))
    samples = [ds[i] for i in range(len(ds))]
    flagged = [df["relative_path"][i] for i, smp in enumerate(samples) if smp["error"]]
    assert flagged == ["broken.png"] and "broken.png" in samples[list(df["relative_path"]).index("broken.png")]["error"]
    assert all(smp["image"].shape == (3, 32, 32) for smp in samples)
    with pytest.raises(DatasetRootError, match="no image file"):
        scan_image_folder(_empty(tmp_path))
    with pytest.raises(DatasetRootError, match="not a folder"):
        scan_image_folder(tmp_path / "missing")


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    (d / "readme.txt").write_text("x")
    return d


def test_overlay_is_at_the_images_size_with_outline_and_an_uncut_banner():
    """The inference picture keeps the image's own size (longer side capped, aspect kept), outlines
    the pixels over the threshold, and wraps a long verdict instead of cutting it."""
    from uad.metrics.plots import image_overlay_png

    img = np.full((200, 300, 3), 128, np.uint8)
    amap = np.zeros((200, 300), np.float32)
    amap[120:160, 100:200] = 2.0
    text = "ANOMALOUS  score 2 (threshold 1)  dinomaly  " + "/a/very/long/folder/name" * 6 + "/part.png"
    out = np.asarray(Image.open(__import__("io").BytesIO(image_overlay_png(img, amap, 1.0, text, True))))
    assert out.shape == (200, 300, 3)
    assert (out[120, 150] == 255).all()  # the outline of the pixels over the threshold
    assert out[3, 3, 0] > out[3, 3, 1] + 40  # red banner (anomalous), drawn inside the picture
    big = np.asarray(Image.open(__import__("io").BytesIO(image_overlay_png(np.zeros((1500, 2000, 3), np.uint8),
                                                                       np.zeros((1500, 2000), np.float32), 1.0,
                                                                       "normal", False))))
    assert big.shape == (768, 1024, 3)  # capped at 1024 px, aspect kept
    with_nan = np.full((50, 60), np.nan, np.float32)
    with_nan[10:40, 10:50] = 0.5
    assert np.asarray(Image.open(__import__("io").BytesIO(image_overlay_png(np.zeros((50, 60, 3), np.uint8), with_nan,
                                                                            1.0, "normal", False)))).shape == (50, 60, 3)


def test_inpformer_onnx_export_equals_torch():
    """The whole path (encoder, INP extractor, decoder, residual head, maps, blur, score) in one
    ONNX graph with a dynamic batch: onnxruntime equals torch to 1e-4 on a batch size other than
    the traced one. Two encoder layers and two decoder blocks: every piece of the path, a quarter
    of the graph to export."""
    from uad.export import export_onnx, onnx_predict, preprocessing_spec
    from uad.methods.registry import build_method

    m = build_method("inpformer", dict(backbone="dinov2_vits14_reg", weights="random", allow_random=True, resize=64, crop=56,
                                       layers=[0, 1], decoder_depth=2))
    data, info = export_onnx(m, batch=2)
    assert info["batch"] == "dynamic" and info["bytes"] == len(data)
    x = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    maps, scores = onnx_predict(data, x)
    ref = m.predict(x)
    np.testing.assert_allclose(maps, ref.maps.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(scores, ref.scores.numpy(), atol=1e-4, rtol=0)
    spec = preprocessing_spec(m)
    assert (spec["resize"], spec["crop"]) == (64, 56) and len(spec["mean"]) == 3
