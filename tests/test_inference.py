"""The one inference path (uad.inference): frames, tiles, maps at the image's own size, decisions.

A transparent stand-in method (its map is the image's redness, its score the map's maximum) makes
every geometric claim checkable to the pixel; the real methods go through the same class in
test_kedro_runs (the ``infer`` pipeline) and test_mlflow_model (the served model)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from uad.errors import ConfigError
from uad.inference import Inferencer, plan_frame, stitch
from uad.methods.base import AnomalyMethod, Prediction


class Redness(AnomalyMethod):
    """map = red - (green + blue) / 2 of the normalised input (mean 0, std 1 per channel), score =
    the map's maximum. ``multiple`` None: crop x crop inputs only (like RLR / AGPNet)."""

    name = "redness"

    def __init__(self, resize=64, crop=56, multiple=None):
        super().__init__({})
        self.spec = {"resize": resize, "crop": crop, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
        self.multiple, self.shapes = multiple, []

    @property
    def input_spec(self):
        return self.spec

    def input_multiple(self):
        return self.multiple

    def modules(self):
        return {}

    def predict(self, images):
        self.shapes.append(tuple(images.shape))
        if self.multiple is None:
            assert images.shape[-2:] == (self.spec["crop"],) * 2, images.shape
        else:
            assert images.shape[-2] % self.multiple == 0 and images.shape[-1] % self.multiple == 0
        m = images[:, 0] - 0.5 * (images[:, 1] + images[:, 2])
        return Prediction(scores=m.flatten(1).max(1).values, maps=m)


def _grey(h, w, value=128):
    return np.full((h, w, 3), value, np.uint8)


def _with_red_square(h, w, y, x, s):
    img = _grey(h, w)
    img[y:y + s, x:x + s] = (255, 0, 0)
    return img


THR = {"image": 0.3, "pixel": 0.3, "image_source": "test", "pixel_source": "test"}


def test_tiles_cover_every_pixel_flush_with_the_border():
    spec = {"resize": 64, "crop": 56}
    for h, w in [(56, 56), (64, 64), (64, 200), (300, 64), (57, 1000)]:
        for overlap in (0.0, 0.25, 0.5):
            plan = plan_frame(h, w, spec, None, "full", short_side=None, max_side=None, tile_overlap=overlap)
            H, W = plan.size
            assert min(H, W) == 64 or (h, w) == (56, 56) and min(H, W) == 64
            seen = np.zeros((H, W), int)
            for y, x in plan.tiles:
                assert 0 <= y <= H - 56 and 0 <= x <= W - 56
                seen[y:y + 56, x:x + 56] += 1
            assert seen.min() >= 1, (h, w, overlap)  # every pixel scored
            ys, xs = sorted({y for y, _ in plan.tiles}), sorted({x for _, x in plan.tiles})
            assert ys[-1] == H - 56 and xs[-1] == W - 56  # the last tiles touch the border
            step = round(56 * (1 - overlap))
            assert all(b - a <= step for a, b in zip(ys, ys[1:])) and all(b - a <= step for a, b in zip(xs, xs[1:]))
    # a method that takes any multiple of 14: the whole frame at once, aspect kept to the multiple
    plan = plan_frame(1500, 2000, {"resize": 448, "crop": 392}, 14, "full", max_side=1024)
    assert plan.tiles == () and plan.size == (448, 602)
    # beyond max_side it tiles too; the crop frame is the evaluation's centre crop
    assert plan_frame(448, 3000, {"resize": 448, "crop": 392}, 14, "full", max_side=1024).tiles
    crop = plan_frame(100, 300, {"resize": 64, "crop": 56}, 14, "crop")
    assert crop.size == (64, 64) and crop.tiles == ((4, 4),)


def test_stitch_keeps_single_tile_pixels_and_blends_overlaps():
    plan = plan_frame(64, 120, {"resize": 64, "crop": 56}, None, "full", max_side=None, tile_overlap=0.5)
    pieces = [np.full((56, 56), float(k), np.float32) for k in range(len(plan.tiles))]
    out = stitch(pieces, plan)
    assert out.shape == plan.size
    first_only = np.ones(plan.size, bool)
    for y, x in plan.tiles[1:]:
        first_only[y:y + 56, x:x + 56] = False
    assert (out[first_only] == 0.0).all()  # pixels only the first tile saw keep its value exactly
    assert out.min() >= 0 and out.max() <= len(plan.tiles) - 1  # convex blend elsewhere
    same = stitch([np.full((56, 56), 2.5, np.float32)] * len(plan.tiles), plan)
    np.testing.assert_allclose(same, 2.5, rtol=0, atol=1e-6)


@pytest.mark.parametrize("multiple", [None, 8])
def test_full_frame_finds_a_border_defect_the_crop_never_sees(multiple):
    """A red square in the outermost 5 % of a 300 x 200 image: flagged in the full frame (tiles
    for a fixed-size method, the whole frame for an any-size one), invisible to the crop."""
    method = Redness(multiple=multiple)
    img = _with_red_square(200, 300, 2, 285, 8)  # right edge, within the outer 5 % (15 px)
    full = Inferencer(method, THR, device="cpu").predict(img)[0]
    crop = Inferencer(method, THR, device="cpu", frame="crop").predict(img)[0]
    assert full.map.shape == (200, 300) and crop.map.shape == (200, 300)
    assert full.decision == "anomalous" and full.score > 0.5
    assert crop.decision == "normal" and crop.score < 0.05
    assert full.map[2:10, 285:293].mean() > 0.5 and np.isnan(crop.map[:, 290:]).all()
    assert np.isfinite(crop.map[100, 150]) and np.isfinite(full.map).all()
    if multiple is None:
        assert full.pieces > 1 and all(s[-2:] == (56, 56) for s in method.shapes)
    else:
        assert full.pieces == 1


def test_maps_are_at_each_images_own_size_and_located():
    method = Redness()
    inf = Inferencer(method, THR, device="cpu")
    sizes = [(200, 300), (1500, 2000), (56, 56), (31, 500)]
    imgs = [_with_red_square(h, w, h // 2, w // 2, max(2, min(h, w) // 8)) for h, w in sizes]
    res = inf.predict(imgs)
    for (h, w), r in zip(sizes, res):
        assert r.size == (h, w) and r.map.shape == (h, w) and r.map.dtype == np.float32
        peak = np.unravel_index(np.argmax(r.map), r.map.shape)
        assert abs(peak[0] - h // 2) <= max(4, h // 16) + min(h, w) // 8 and abs(peak[1] - w // 2) <= max(4, w // 16) + min(h, w) // 8
        assert r.decision == "anomalous"
    assert inf.predict([_grey(120, 90)])[0].decision == "normal"


def test_inputs_of_every_kind_and_errors_listed(tmp_path):
    method = Redness()
    inf = Inferencer(method, THR, device="cpu", image_threshold=0.2)
    assert inf.thresholds["image"] == 0.2 and inf.thresholds["image_source"] == "user"
    img = _with_red_square(80, 100, 30, 30, 10)
    p = tmp_path / "a b" / "part.png"
    p.parent.mkdir()
    Image.fromarray(img).save(p)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    res = inf.predict([str(p), Image.fromarray(img), img, buf.getvalue(), img[..., 0], str(bad), np.zeros((4, 4, 3))])
    scores = [r.score for r in res[:4]]
    assert np.allclose(scores, scores[0]) and res[0].source == str(p)
    assert res[4].status == "ok" and res[4].decision == "normal"  # grey input: no redness
    assert res[5].status == "unreadable" and "broken.png" in res[5].error and res[5].decision == "error"
    assert res[6].status == "unreadable" and "uint8" in res[6].error
    with pytest.raises(Exception, match="broken.png"):
        inf.predict([str(bad)], strict=True)


def test_non_finite_output_is_an_error_not_a_verdict():
    class Broken(Redness):
        def predict(self, images):
            out = super().predict(images)
            return Prediction(scores=out.scores * float("nan"), maps=out.maps)

    r = Inferencer(Broken(), THR, device="cpu").predict(_grey(64, 64))[0]
    assert r.status == "error" and r.decision == "error" and "non-finite" in r.error


def test_bad_settings_are_one_clear_error():
    for kwargs, key in [({"frame": "bogus"}, "infer.frame"), ({"batch_size": 0}, "infer.batch_size"),
                        ({"max_side": 10}, "infer.max_side"), ({"image_threshold": "abc"}, "infer.image_threshold")]:
        with pytest.raises(ConfigError, match=key):
            Inferencer(Redness(), THR, device="cpu", **kwargs)
    with pytest.raises(ConfigError, match="short_side"):
        Inferencer(Redness(), THR, device="cpu", short_side=20).predict(_grey(64, 64))
    with pytest.raises(ConfigError, match="thresholds file"):
        Inferencer(Redness(), "/nonexistent/thresholds.json", device="cpu")


def test_batches_group_whole_frames_of_one_shape():
    method = Redness(multiple=8)
    inf = Inferencer(method, THR, device="cpu", batch_size=3)
    inf.predict([_grey(64, 96)] * 5 + [_grey(64, 64)] * 2)
    assert sorted(s[0] for s in method.shapes) == [2, 2, 3]  # 5 frames of one shape in 3 + 2, the others together


def test_real_method_tiles_equal_direct_prediction():
    """With a real trained-shape method (AGPNet, fixed input): an image of exactly the crop at the
    training scale is one tile, and its score and map equal ``method.predict`` on the same input."""
    import yaml

    from uad.methods.registry import build_method

    params = yaml.safe_load(open("conf/smoke/parameters_agpnet.yml"))["agpnet"]["method"]
    method = build_method("agpnet", params)
    spec = method.input_spec
    inf = Inferencer(method, THR, device="cpu", precision="fp32")
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (spec["resize"], spec["resize"], 3), dtype=np.uint8)
    r = inf.predict(img)[0]
    o = (spec["resize"] - spec["crop"]) // 2
    if spec["resize"] == spec["crop"]:
        x = torch.from_numpy(img).permute(2, 0, 1).float()[None] / 255
        x = (x - torch.tensor(spec["mean"]).view(1, 3, 1, 1)) / torch.tensor(spec["std"]).view(1, 3, 1, 1)
        with torch.no_grad():
            ref = method.predict(x)
        assert r.pieces == 1 and abs(r.score - float(ref.scores[0])) < 1e-5
        np.testing.assert_allclose(r.map, ref.maps[0].numpy(), atol=1e-5, rtol=0)
    else:
        assert r.pieces >= 2 and o >= 0
