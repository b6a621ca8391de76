"""Tests of the pseudo-anomaly synthesis core (uad.synthesis): small images, fixed seeds."""

from __future__ import annotations

import math
import pickle
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from uad.synthesis import (
    TEXTURE_AUGMENTERS,
    DTDTextureSource,
    MixedSynthesizer,
    MixedTextureSource,
    PasteConfig,
    ProceduralTextureSource,
    PseudoAnomalySynthesizer,
    RealAnomalyPaster,
    SelfTextureSource,
    SynthesisAugment,
    SynthesisConfig,
    TextureSourceError,
    augment_texture,
    blend_texture,
    estimate_foreground,
    fade,
    make_texture_source,
    perlin_mask,
    perlin_noise,
    preview_grid,
)
from uad.synthesis.textures import TextureSource


def _object_image(size: int = 64, seed: int = 0) -> np.ndarray:
    """A bright square object on a dark noisy background."""
    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), 50, np.uint8)
    a, b = size // 4, 3 * size // 4
    img[a:b, a:b] = (210, 160, 60)
    return np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)


class ConstantTexture(TextureSource):
    """A texture source that draws nothing from the generator (for exact blend checks)."""

    def __init__(self, color=(255, 0, 255)):
        self.color = np.array(color, np.uint8)

    def sample(self, rng, size):
        return np.broadcast_to(self.color, (*size, 3)).copy()


@pytest.fixture
def synth() -> PseudoAnomalySynthesizer:
    return PseudoAnomalySynthesizer(ProceduralTextureSource(), SynthesisConfig(anomaly_probability=1.0))


# ------------------------------------------------------------------------------------ Perlin


def test_fade_curve():
    t = np.array([0.0, 0.5, 1.0, 0.25])
    np.testing.assert_allclose(fade(t), 6 * t**5 - 15 * t**4 + 10 * t**3)
    np.testing.assert_allclose(fade(t)[:3], [0.0, 0.5, 1.0])


def test_perlin_noise_matches_direct_formula():
    """Oracle: Perlin's definition evaluated pixel by pixel on a tiny grid."""
    shape, res = (12, 18), (2, 3)
    noise = perlin_noise(shape, res, np.random.default_rng(7))
    angles = np.random.default_rng(7).uniform(0, 2 * math.pi, size=(res[0] + 1, res[1] + 1))
    expected = np.zeros(shape)
    for i in range(shape[0]):
        for j in range(shape[1]):
            y, x = i * res[0] / shape[0], j * res[1] / shape[1]
            y0, x0 = int(y), int(x)
            fy, fx = y - y0, x - x0

            def dot(cy, cx):
                a = angles[y0 + cy, x0 + cx]
                return math.sin(a) * (fy - cy) + math.cos(a) * (fx - cx)

            u, v = fade(fx), fade(fy)
            top = dot(0, 0) + u * (dot(0, 1) - dot(0, 0))
            bottom = dot(1, 0) + u * (dot(1, 1) - dot(1, 0))
            expected[i, j] = math.sqrt(2) * (top + v * (bottom - top))
    assert noise.dtype == np.float32 and noise.shape == shape
    np.testing.assert_allclose(noise, expected, atol=1e-5)
    assert np.abs(noise).max() <= 1.0 + 1e-6


def test_perlin_noise_non_divisible_shape_is_padded_crop():
    padded = perlin_noise((40, 56), (4, 8), np.random.default_rng(3))
    cropped = perlin_noise((37, 50), (4, 8), np.random.default_rng(3))
    assert cropped.shape == (37, 50)
    np.testing.assert_allclose(cropped, padded[:37, :50], atol=1e-6)
    assert perlin_noise((5, 3), (32, 32), np.random.default_rng(0)).shape == (5, 3)


def test_perlin_rotation_matches_image_rotation():
    base = perlin_noise((64, 64), (4, 4), np.random.default_rng(1))
    rotated = perlin_noise((64, 64), (4, 4), np.random.default_rng(1), angle=35.0)
    reference = ndimage.rotate(base, 35.0, reshape=False, order=1, cval=0.0)
    # scipy interpolates the sampled noise bilinearly; the rotated evaluation is exact
    np.testing.assert_allclose(rotated[16:48, 16:48], reference[16:48, 16:48], atol=1.5e-2)
    assert rotated[0, 0] == 0.0  # corner outside the rotated image: DRAEM's zero fill


def test_perlin_mask_binary_nonempty_and_impossible_threshold():
    rng = np.random.default_rng(0)
    for _ in range(20):
        m = perlin_mask((48, 40), rng)
        assert m.dtype == np.bool_ and m.shape == (48, 40) and m.any()
    m = perlin_mask((16, 16), rng, threshold=1.5, max_tries=3)
    assert m.dtype == np.bool_ and not m.any()


# ------------------------------------------------------------------------------- synthesizer


def test_blend_formula_and_outside_unchanged():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    texture = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    mask = rng.random((20, 24)) < 0.3
    out = blend_texture(image, texture, mask, 0.3)
    expected = np.rint(0.7 * texture.astype(np.float64) + 0.3 * image)  # DRAEM blend inside M
    diff = np.abs(out[mask].astype(int) - expected[mask].astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.95  # float32 vs float64 rounding of ties
    np.testing.assert_array_equal(out[~mask], image[~mask])


def test_synthesizer_outputs_and_exact_outside(synth):
    image = _object_image()
    rng = np.random.default_rng(5)
    for _ in range(10):
        out, mask, label = synth(image, rng)
        assert out.dtype == np.uint8 and out.shape == image.shape
        assert mask.dtype == np.bool_ and mask.shape == image.shape[:2]
        assert label == 1 and mask.any()
        np.testing.assert_array_equal(out[~mask], image[~mask])
    assert image.flags.writeable and (image == _object_image()).all()  # input untouched


def test_synthesizer_texture_inside_mask():
    image = _object_image()
    cfg = SynthesisConfig(anomaly_probability=1.0, texture_augmentations=0, beta_range=(0.0, 0.0))
    out, mask, label = PseudoAnomalySynthesizer(ConstantTexture(), cfg)(image, np.random.default_rng(1))
    assert label == 1
    assert (out[mask] == (255, 0, 255)).all()  # beta = 0: the texture replaces the image in M


def test_no_anomaly_sample():
    image = _object_image()
    s = PseudoAnomalySynthesizer(ConstantTexture(), SynthesisConfig(anomaly_probability=0.0))
    out, mask, label = s(image, np.random.default_rng(0))
    assert label == 0 and not mask.any() and mask.dtype == np.bool_
    np.testing.assert_array_equal(out, image)


@pytest.mark.parametrize("p", [0.5, 0.2])
def test_no_anomaly_fraction_binomial(p):
    n = 400
    cfg = SynthesisConfig(anomaly_probability=p, texture_augmentations=0)
    augment = SynthesisAugment(PseudoAnomalySynthesizer(ConstantTexture(), cfg), seed=11)
    image = _object_image(32)
    labels = np.array([augment(image, i)[2] for i in range(n)])
    tol = 4.0 * math.sqrt(p * (1 - p) / n)  # 4 sigma
    assert abs(labels.mean() - p) < tol


def test_determinism_seed_index_epoch(synth):
    image = _object_image()
    a = SynthesisAugment(synth, seed=3)
    b = SynthesisAugment(synth, seed=3)
    out1, m1, l1 = a(image, 7)
    out2, m2, l2 = b(image, 7)
    np.testing.assert_array_equal(out1, out2)
    np.testing.assert_array_equal(m1, m2)
    assert l1 == l2
    out3, m3, _ = a(image, 8)
    assert not np.array_equal(m1, m3)
    a.epoch = 1
    out4, m4, _ = a(image, 7)
    assert not np.array_equal(m1, m4)
    a.epoch = 0  # order of calls does not matter
    np.testing.assert_array_equal(a(image, 7)[0], out1)
    c = pickle.loads(pickle.dumps(a))  # as a DataLoader worker would get it
    np.testing.assert_array_equal(c(image, 7)[0], out1)


def test_foreground_restriction_given_mask(synth):
    image = _object_image()
    fg = np.zeros(image.shape[:2], bool)
    fg[:, :32] = True
    rng = np.random.default_rng(2)
    for _ in range(15):
        out, mask, label = synth(image, rng, foreground=fg)
        assert not (mask & ~fg).any()
        np.testing.assert_array_equal(out[~mask], image[~mask])
        assert label == int(mask.any())
    out, mask, label = synth(image, rng, foreground=np.zeros_like(fg))  # impossible: normal sample
    assert label == 0 and not mask.any()
    np.testing.assert_array_equal(out, image)


def test_foreground_estimate_and_per_call_switch(synth):
    image = _object_image()
    fg = estimate_foreground(image)
    truth = np.zeros(image.shape[:2], bool)
    truth[16:48, 16:48] = True
    assert fg.dtype == np.bool_ and fg.shape == truth.shape
    assert (fg & truth).sum() / truth.sum() > 0.98  # the object is covered
    assert (fg & truth).sum() / fg.sum() > 0.7  # with a small dilated margin
    flat = np.full((40, 40, 3), 90, np.uint8)
    assert estimate_foreground(flat).all()  # unusable estimate: no restriction
    thr = estimate_foreground(image, method="threshold", threshold=40.0)
    assert (thr & truth).sum() / truth.sum() > 0.98 and (thr & truth).sum() / thr.sum() > 0.6
    rng = np.random.default_rng(4)
    for _ in range(10):
        _, mask, _ = synth(image, rng, restrict_to_foreground=True)
        assert not (mask & ~fg).any()
    aug = SynthesisAugment(synth, seed=0, foreground_mode="auto", foreground_for={1, 2})
    for i in (1, 2):
        assert not (aug(image, i)[1] & ~fg).any()


# ------------------------------------------------------------------------------ textures


def _write_jpegs(folder, n=3, size=(20, 24)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"banded_{i}.jpg")


def test_dtd_loader_layouts_and_cache(tmp_path):
    _write_jpegs(tmp_path / "dtd" / "images" / "banded")
    _write_jpegs(tmp_path / "dtd" / "images" / "dotted", n=2)
    for root in (tmp_path, tmp_path / "dtd", tmp_path / "dtd" / "images"):
        src = DTDTextureSource(root)
        assert len(src) == 5
    rng = np.random.default_rng(0)
    tex = src.sample(rng, (32, 40))
    assert tex.dtype == np.uint8 and tex.shape == (32, 40, 3) and tex.flags.writeable
    for _ in range(20):
        src.sample(rng, (32, 40))
    assert src.cache_info["hits"] > 0 and src.cache_info["size"] <= 5
    a = DTDTextureSource(tmp_path, cache_size=0).sample(np.random.default_rng(9), (16, 16))
    b = DTDTextureSource(tmp_path).sample(np.random.default_rng(9), (16, 16))
    np.testing.assert_array_equal(a, b)  # the cache changes speed, not results
    source, desc = make_texture_source("dtd", dtd_root=tmp_path)
    assert isinstance(source, DTDTextureSource) and desc.startswith("dtd")


def test_dtd_errors_name_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(TextureSourceError, match="nowhere"):
        DTDTextureSource(missing)
    empty = tmp_path / "empty_dtd"
    (empty / "images" / "banded").mkdir(parents=True)
    with pytest.raises(TextureSourceError, match="no .jpg") as exc:
        DTDTextureSource(empty)
    assert str(empty) in str(exc.value)
    corrupt_root = tmp_path / "bad"
    (corrupt_root / "images" / "banded").mkdir(parents=True)
    (corrupt_root / "images" / "banded" / "broken.jpg").write_bytes(b"this is not a jpeg")
    src = DTDTextureSource(corrupt_root)
    with pytest.raises(TextureSourceError, match="broken.jpg"):
        src.sample(np.random.default_rng(0), (16, 16))
    # kind "dtd" never falls back silently
    with pytest.raises(TextureSourceError):
        make_texture_source("dtd", dtd_root=None, images=[_object_image()])
    with pytest.raises(TextureSourceError, match="nowhere"):
        make_texture_source("dtd", dtd_root=missing, images=[_object_image()])
    with pytest.raises(ValueError):
        make_texture_source("imagenet")


def test_self_procedural_mixed_sources():
    rng = np.random.default_rng(0)
    images = [_object_image(48, s) for s in range(3)]
    for source in (SelfTextureSource(images), ProceduralTextureSource(), MixedTextureSource(
            [SelfTextureSource(images), ProceduralTextureSource()], [1, 3])):
        for _ in range(6):
            tex = source.sample(rng, (30, 50))
            assert tex.dtype == np.uint8 and tex.shape == (30, 50, 3)
    for kind in ProceduralTextureSource.KINDS:
        tex = ProceduralTextureSource([kind]).sample(np.random.default_rng(1), (40, 40))
        assert tex.shape == (40, 40, 3) and tex.astype(float).std() > 1.0, kind
    source, desc = make_texture_source("fallback", images=images)
    assert desc.startswith("fallback") and source.sample(rng, (8, 8)).shape == (8, 8, 3)
    assert make_texture_source("procedural")[1].startswith("procedural")
    assert make_texture_source("self", images=images)[1].startswith("self")


def test_texture_augmentation():
    tex = ProceduralTextureSource().sample(np.random.default_rng(0), (24, 32))
    from PIL import Image as _Image

    for name, fn in TEXTURE_AUGMENTERS:  # each augmenter runs and keeps size / mode
        out = fn(_Image.fromarray(tex), np.random.default_rng(0))
        assert out.size == (32, 24) and out.mode == "RGB", name
    a = augment_texture(tex, np.random.default_rng(5))
    b = augment_texture(tex, np.random.default_rng(5))
    assert a.dtype == np.uint8 and a.shape == tex.shape
    np.testing.assert_array_equal(a, b)
    inv = dict(TEXTURE_AUGMENTERS)["invert"](_Image.fromarray(tex), np.random.default_rng(0))
    np.testing.assert_array_equal(np.asarray(inv), 255 - tex)


# ------------------------------------------------------------------- semi-supervised paste


def _anomalous(size=64):
    rng = np.random.default_rng(3)
    img = _object_image(size, 1)
    mask = np.zeros((size, size), bool)
    mask[10:18, 40:52] = True  # an 8 x 12 defect
    img[mask] = rng.integers(0, 256, (mask.sum(), 3), dtype=np.uint8)
    return img, mask


def test_paste_puts_real_anomaly_pixels_under_mask():
    anom, amask = _anomalous()
    cfg = PasteConfig(anomaly_probability=1.0, scale_range=(1.0, 1.0), flip=False, rotate90=False,
                      brightness=0.0, contrast=0.0)
    paster = RealAnomalyPaster([anom], [amask], cfg)
    target = _object_image(64, 7)
    rng = np.random.default_rng(0)
    for _ in range(5):
        out, mask, label = paster(target, rng)
        assert label == 1 and mask.dtype == np.bool_ and mask.sum() == amask.sum()
        ys, xs = np.nonzero(mask)
        assert (ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) == (8, 12)
        np.testing.assert_array_equal(out[mask].reshape(8, 12, 3), anom[10:18, 40:52])
        np.testing.assert_array_equal(out[~mask], target[~mask])


def test_paste_augmented_with_foreground_and_mixing():
    anom, amask = _anomalous()
    paster = RealAnomalyPaster([anom], [amask], PasteConfig(anomaly_probability=1.0, max_patches=2))
    target = _object_image(64, 7)
    fg = np.zeros((64, 64), bool)
    fg[32:, :] = True
    rng = np.random.default_rng(1)
    for _ in range(10):
        out, mask, label = paster(target, rng, foreground=fg)
        assert label == int(mask.any()) and not (mask & ~fg).any()
        np.testing.assert_array_equal(out[~mask], target[~mask])
    with pytest.raises(ValueError):
        RealAnomalyPaster([anom], [np.zeros_like(amask)])
    cfg = SynthesisConfig(anomaly_probability=1.0, texture_augmentations=0, beta_range=(0.0, 0.0))
    synth = PseudoAnomalySynthesizer(ConstantTexture(), cfg)
    mixed = MixedSynthesizer([(synth, 0.5), (paster, 0.5)])
    aug = SynthesisAugment(mixed, seed=0)
    pasted = 0
    for i in range(20):
        out, mask, label = aug(target, i)
        assert label == 1
        np.testing.assert_array_equal(out[~mask], target[~mask])
        pasted += int(not (out[mask] == (255, 0, 255)).all())
    assert 0 < pasted < 20  # both components used


# ------------------------------------------------------------------------ preview & config


def test_preview_grid(synth):
    image = _object_image()
    out, mask, _ = synth(image, np.random.default_rng(0))
    grid = preview_grid([(image, mask, out), (image, np.zeros((64, 64), bool), image)])
    assert grid.dtype == np.uint8 and grid.ndim == 3 and grid.shape[2] == 3
    assert grid.shape == (2 * 64 + 3 * 4, 4 * 64 + 5 * 4, 3)
    overlay = grid[4 : 4 + 64, 4 + 3 * 68 : 4 + 3 * 68 + 64]
    assert ((overlay == (255, 0, 0)).all(axis=2)).any()  # red contour


def test_config_from_dict_and_validation():
    cfg = SynthesisConfig.from_dict({"beta_range": [0.1, 0.5], "anomaly_probability": 1.0})
    assert cfg.beta_range == (0.1, 0.5)
    with pytest.raises(ValueError, match="bogus"):
        SynthesisConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError):
        SynthesisConfig(foreground="object")
    with pytest.raises(ValueError):
        SynthesisConfig(anomaly_probability=1.5)
    assert PasteConfig.from_dict({"scale_range": [1, 1]}).scale_range == (1.0, 1.0)


def test_core_imports_no_kedro_or_mlflow():
    code = "import sys, uad.synthesis; print(any(m.split('.')[0] in ('kedro', 'mlflow') for m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_rotated_masks_match_draem_rotate_then_threshold():
    """Mask statistics: evaluating the noise at rotated coordinates gives the masks DRAEM gets by
    rotating the noise image (bilinear, zero fill) and thresholding."""
    ious, cov_ours, cov_ref = [], [], []
    for seed in range(30):
        rng = np.random.default_rng(seed)
        res = tuple(int(2 ** k) for k in rng.integers(0, 4, size=2))
        angle = float(rng.uniform(-90, 90))
        ours = perlin_noise((64, 64), res, np.random.default_rng(seed + 100), angle=angle) > 0.5
        base = perlin_noise((64, 64), res, np.random.default_rng(seed + 100))
        ref = ndimage.rotate(base, angle, reshape=False, order=1, cval=0.0) > 0.5
        cov_ours.append(ours.mean())
        cov_ref.append(ref.mean())
        if ref.any() or ours.any():
            ious.append((ours & ref).sum() / (ours | ref).sum())
    assert np.mean(ious) > 0.9
    assert abs(np.mean(cov_ours) - np.mean(cov_ref)) < 0.1 * np.mean(cov_ref) + 1e-3


def test_plugs_into_anomaly_image_dataset(tmp_path):
    """SynthesisAugment is the dataset hook: masks and labels replace the sample's."""
    pd = pytest.importorskip("pandas")
    from uad.data.torch_data import AnomalyImageDataset

    rows = []
    for i in range(3):
        path = tmp_path / f"good_{i}.png"
        Image.fromarray(_object_image(40, i)).save(path)
        rows.append({"dataset": "t", "class_name": "obj", "split": "train", "label": 0,
                     "defect_type": "good", "image_path": str(path), "mask_path": ""})
    synth = PseudoAnomalySynthesizer(ProceduralTextureSource(), SynthesisConfig(anomaly_probability=1.0))
    ds = AnomalyImageDataset(pd.DataFrame(rows), resize=40, crop=32, augment=SynthesisAugment(synth, seed=1))
    a, b = ds[1], ds[1]
    assert a["label"].item() == 1 and a["mask"].sum() > 0
    assert set(np.unique(a["mask"].numpy())) <= {0.0, 1.0}
    np.testing.assert_array_equal(a["image"].numpy(), b["image"].numpy())
    ds.set_epoch(1)
    assert not np.array_equal(ds[1]["mask"].numpy(), a["mask"].numpy())


def test_numpy_morphology_matches_scipy():
    from uad.synthesis.synthesizer import _dilate3, _erode3

    m = np.random.default_rng(0).random((30, 23)) < 0.4
    square = np.ones((3, 3), bool)
    np.testing.assert_array_equal(_erode3(m), ndimage.binary_erosion(m, square, border_value=0))
    np.testing.assert_array_equal(_dilate3(m), ndimage.binary_dilation(m, square))
