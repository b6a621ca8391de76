"""Pseudo-anomaly synthesis (DRAEM and GLAD recipes) and real-anomaly pasting (semi-supervised).

INP-Former++ trains its segmentation head on feature residuals of pseudo-anomalous images
(sec. 3.5, eq. 7 residual ``f_res = (1 - cos) * |f_Q - f_D|``, eq. 8 Dice loss), made "similar to
DRAEM" from Perlin noise and DTD textures; in the semi-supervised setting it also "augments the
anomalous regions of a few real anomalies and randomly embeds them into normal images" (following
PRN). DRAEM (Zavrtanik et al., ICCV 2021, sec. 3.3, simulated anomaly generation):

    M  = [Perlin(2^ky x 2^kx cells, rotated) > 0.5]               (binary anomaly mask)
    I' = (1 - M) * I + (1 - beta) * (M * T) + beta * (M * I),    beta ~ U(0, 0.8)

with ``T`` an augmented texture; half of the training samples are left normal (empty mask,
label 0).

CostFilter-AD synthesises its training anomalies "following the protocol of GLAD", which is not
DRAEM's recipe (:data:`RECIPES` ``"glad"``, as the released CostFilter-AD / GLAD data code does it):
the Perlin threshold is 0.3 instead of 0.5; half of the anomaly sources are not a texture but the
image itself, augmented and cut into an 8 x 8 grid of tiles that are shuffled (a "structure"
anomaly, after MemSeg); and the mask is restricted to the object by a per-class Otsu threshold of
the grey image (:data:`GLAD_FOREGROUND`: the object is the dark or the bright side).

Outputs are uint8: outside the mask the output equals the input bit for bit; inside, the blend is
computed in float32 and rounded to nearest.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from uad.synthesis.perlin import perlin_noise, sample_perlin_params
from uad.synthesis.textures import TextureSource, _check_rgb, augment_texture

__all__ = [
    "FOREGROUND_METHODS",
    "GLAD_FOREGROUND",
    "RECIPES",
    "grid_shuffle",
    "MixedSynthesizer",
    "PasteConfig",
    "PseudoAnomalySynthesizer",
    "RealAnomalyPaster",
    "SynthesisAugment",
    "SynthesisConfig",
    "blend_texture",
    "estimate_foreground",
    "otsu_foreground",
    "preview_grid",
]

FOREGROUND_METHODS = ("none", "auto", "threshold", "otsu_dark", "otsu_bright")

#: named recipes: SynthesisConfig values a recipe sets (explicit ``config`` values win)
RECIPES: dict[str, dict] = {
    "draem": {},
    "glad": {"threshold": 0.3, "structure_probability": 0.5, "structure_grid": 8},
}

#: GLAD's per-class foreground (the released ``generate_target_foreground_mask`` modes 1 and 2:
#: Otsu on the grey image, the object being the dark or the bright side); other classes: anywhere
GLAD_FOREGROUND: dict[str, str] = {
    **{c: "otsu_dark" for c in ("screw", "bottle", "capsule", "zipper", "bracket_black", "bracket_brown",
                                "metal_plate", "03")},
    **{c: "otsu_bright" for c in ("hazelnut", "pill", "metal_nut", "toothbrush", "candle", "cashew", "chewinggum",
                                  "fryum", "macaroni1", "macaroni2", "pipe_fryum", "bracket_white", "01")},
}
Sample = tuple[np.ndarray, np.ndarray, int]


def _ndimage():
    """``scipy.ndimage``, imported on first use: the DRAEM synthesizer itself needs only numpy and
    PIL (the accelerator machine may lack scipy); the foreground estimate and the real-anomaly
    paster need scipy's morphology and connected components."""
    try:
        from scipy import ndimage
    except ImportError as exc:  # pragma: no cover - scipy is a project dependency
        raise ImportError(
            "estimate_foreground and RealAnomalyPaster need scipy (pip install scipy)"
        ) from exc
    return ndimage


def _erode3(mask: np.ndarray) -> np.ndarray:
    """Binary erosion by a 3x3 square, outside = False (numpy shifts, no scipy)."""
    p = np.pad(mask, 1, constant_values=False)
    h, w = mask.shape
    out = mask.copy()
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):  # 9 shifted views of the whole array, not a pixel loop
            out &= p[dy : dy + h, dx : dx + w]
    return out


def _dilate3(mask: np.ndarray) -> np.ndarray:
    """Binary dilation by a 3x3 square (numpy shifts, no scipy)."""
    p = np.pad(mask, 1, constant_values=False)
    h, w = mask.shape
    out = mask.copy()
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            out |= p[dy : dy + h, dx : dx + w]
    return out


def _from_dict(cls, params: Mapping | None):
    """Build a config dataclass from a (Kedro parameters) mapping; lists become tuples and
    unknown keys are an error naming them."""
    params = dict(params or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; valid keys: {sorted(names)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in params.items()})


def _check_range(name: str, value, lo: float, hi: float) -> tuple[float, float]:
    a, b = (float(v) for v in value)
    if not lo <= a <= b <= hi:
        raise ValueError(f"{name} must satisfy {lo} <= low <= high <= {hi}, got {value!r}")
    return a, b


def _check_foreground_method(name: str, value: str) -> None:
    if value not in FOREGROUND_METHODS:
        raise ValueError(f"{name} must be one of {FOREGROUND_METHODS}, got {value!r}")


@dataclass
class SynthesisConfig:
    """Settings of :class:`PseudoAnomalySynthesizer`; defaults are DRAEM's (INP-Former++);
    :meth:`for_recipe` ``("glad")`` gives GLAD's (CostFilter-AD).

    Attributes:
        anomaly_probability: chance that a sample gets an anomaly (DRAEM 0.5; the rest stay normal
            with an empty mask and label 0).
        min_scale_exp, max_scale_exp: Perlin lattice cells per axis ``2**k``,
            ``k ~ U{min, ..., max - 1}`` drawn independently per axis (DRAEM 0 and 6).
        threshold: binarisation threshold of the noise (DRAEM 0.5).
        rotate, rotation_range: random rotation of the noise, degrees (DRAEM [-90, 90]).
        beta_range: texture opacity ``beta ~ U(beta_range)`` in the blend (DRAEM (0, 0.8)).
        texture_augmentations: how many of DRAEM's 10 augmenters are applied to each texture
            (DRAEM 3; 0 disables).
        foreground: restriction of the mask to the object when the caller gives no foreground:
            ``"none"`` (DRAEM: anywhere), ``"auto"`` (:func:`estimate_foreground`, Otsu) or
            ``"threshold"`` (:func:`estimate_foreground` with ``foreground_threshold``). A per-call
            ``restrict_to_foreground`` overrides it (object vs texture classes).
        foreground_threshold: colour distance (0-441 RGB units) for ``"threshold"``.
        min_mask_fraction: masks covering less than this fraction of the image are redrawn
            (0: any non-empty mask, as DRAEM).
        max_retries: redraws of an empty (or too small, or off-foreground) mask before the sample
            is returned as normal (DRAEM returns an empty mask as a normal sample at once; redrawing
            makes the requested anomaly fraction hold).
        structure_probability: chance that the anomaly source is the image itself, augmented like a
            texture and shuffled on a ``structure_grid`` x ``structure_grid`` grid of tiles
            (DRAEM 0; GLAD 0.5 with an 8 x 8 grid).
    """

    anomaly_probability: float = 0.5
    min_scale_exp: int = 0
    max_scale_exp: int = 6
    threshold: float = 0.5
    rotate: bool = True
    rotation_range: tuple[float, float] = (-90.0, 90.0)
    beta_range: tuple[float, float] = (0.0, 0.8)
    texture_augmentations: int = 3
    foreground: str = "none"
    foreground_threshold: float = 30.0
    min_mask_fraction: float = 0.0
    max_retries: int = 16
    structure_probability: float = 0.0
    structure_grid: int = 8

    def __post_init__(self):
        if not 0.0 <= float(self.anomaly_probability) <= 1.0:
            raise ValueError(f"anomaly_probability must be in [0, 1], got {self.anomaly_probability}")
        if not 0 <= int(self.min_scale_exp) < int(self.max_scale_exp):
            raise ValueError(
                f"need 0 <= min_scale_exp < max_scale_exp, got {self.min_scale_exp}, {self.max_scale_exp}"
            )
        self.rotation_range = _check_range("rotation_range", self.rotation_range, -360.0, 360.0)
        self.beta_range = _check_range("beta_range", self.beta_range, 0.0, 1.0)
        if not 0 <= int(self.texture_augmentations) <= 10:
            raise ValueError(f"texture_augmentations must be in [0, 10], got {self.texture_augmentations}")
        _check_foreground_method("foreground", self.foreground)
        if not 0.0 <= float(self.min_mask_fraction) < 1.0:
            raise ValueError(f"min_mask_fraction must be in [0, 1), got {self.min_mask_fraction}")
        if int(self.max_retries) < 1:
            raise ValueError(f"max_retries must be >= 1, got {self.max_retries}")
        if not 0.0 <= float(self.structure_probability) <= 1.0:
            raise ValueError(f"structure_probability must be in [0, 1], got {self.structure_probability}")
        if int(self.structure_grid) < 1:
            raise ValueError(f"structure_grid must be >= 1, got {self.structure_grid}")

    @classmethod
    def for_recipe(cls, recipe: str | None, params: Mapping | None = None) -> SynthesisConfig:
        """The config of a named recipe (:data:`RECIPES`), ``params`` overriding it."""
        name = recipe or "draem"
        if name not in RECIPES:
            raise ValueError(f"unknown synthesis recipe {name!r}; known: {sorted(RECIPES)}")
        return cls.from_dict({**RECIPES[name], **dict(params or {})})

    @classmethod
    def from_dict(cls, params: Mapping | None) -> SynthesisConfig:
        """From a parameters mapping (lists -> tuples); unknown keys raise ``ValueError``."""
        return _from_dict(cls, params)


# --------------------------------------------------------------------------------------------
# Foreground estimate
# --------------------------------------------------------------------------------------------


def _otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold: maximise the between-class variance of a 1-D sample."""
    hi = float(values.max())
    if hi <= 0.0:
        return 0.0
    hist, edges = np.histogram(values, bins=bins, range=(0.0, hi))
    p = hist.astype(np.float64) / max(1, hist.sum())
    centers = 0.5 * (edges[:-1] + edges[1:])
    omega = np.cumsum(p)
    mu = np.cumsum(p * centers)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * omega - mu) ** 2 / (omega * (1.0 - omega))
    between[~np.isfinite(between)] = -1.0
    return float(edges[int(np.argmax(between)) + 1])


def estimate_foreground(
    image: np.ndarray,
    method: str = "auto",
    threshold: float = 30.0,
    border: float = 0.03,
    min_fraction: float = 0.01,
) -> np.ndarray:
    """Rough object mask for object classes, so pseudo-anomalies land on the object.

    Assumes the object sits on a fairly uniform background that touches the image border (true of
    MVTec / VisA object classes):

    1. background colour = per-channel median of a border ring (``border`` x the short side, >= 1 px);
    2. distance = Euclidean RGB distance to it, smoothed by a 5x5 box filter;
       (steps 1-4 run on the image subsampled by ``max(1, min(H, W) // 128)``, the result is
       upsampled nearest-neighbour: a rough mask is all that is needed, at a quarter of the cost);
    3. ``method="auto"``: Otsu threshold of the distance (never below 8, so a flat image is not
       split on sensor noise); ``"threshold"``: the fixed ``threshold``; ``"none"``: all True;
    4. cleanup (scipy.ndimage): opening (3x3, 2 iterations), hole filling, components smaller than
       5 % of the largest dropped, dilation by 2 (subsampled) px.

    When the result covers less than ``min_fraction`` of the image the estimate is deemed unusable
    and the whole image is returned (no restriction) rather than an empty region. Texture classes
    (carpet, grid, ...) have no background: do not restrict them (see ``restrict_to_foreground``).
    Returns ``np.bool_ (H, W)``.
    """
    image = _check_rgb(image)
    _check_foreground_method("method", method)
    h, w = image.shape[:2]
    if method == "none":
        return np.ones((h, w), dtype=bool)
    if method in ("otsu_dark", "otsu_bright"):
        return otsu_foreground(image, bright=method == "otsu_bright")
    ndimage = _ndimage()
    f = max(1, min(h, w) // 128)  # work at 128-255 px on the short side, upsample at the end
    full_shape = (h, w)
    image = image[::f, ::f]
    h, w = image.shape[:2]
    b = max(1, int(round(border * min(h, w))))
    ring = np.concatenate(
        [image[:b].reshape(-1, 3), image[-b:].reshape(-1, 3),
         image[:, :b].reshape(-1, 3), image[:, -b:].reshape(-1, 3)]
    )
    background = np.median(ring, axis=0).astype(np.float32)
    diff = image.astype(np.float32) - background
    dist = np.sqrt(np.einsum("hwc,hwc->hw", diff, diff))  # H, W
    dist = ndimage.uniform_filter(dist, size=5, mode="nearest")
    cut = max(_otsu_threshold(dist), 8.0) if method == "auto" else float(threshold)
    fg = dist > cut
    fg = ndimage.binary_opening(fg, structure=np.ones((3, 3), bool), iterations=2)
    fg = ndimage.binary_fill_holes(fg)
    labels, n = ndimage.label(fg)
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        keep = sizes >= 0.05 * sizes.max()
        keep[0] = False
        fg = keep[labels]
    fg = ndimage.binary_dilation(fg, iterations=2)
    if fg.mean() < min_fraction:
        return np.ones(full_shape, dtype=bool)
    if f > 1:  # nearest-neighbour upsampling back to (H, W)
        fg = np.repeat(np.repeat(fg, f, axis=0), f, axis=1)[: full_shape[0], : full_shape[1]]
    return np.ascontiguousarray(fg)


def otsu_foreground(image: np.ndarray, bright: bool) -> np.ndarray:
    """GLAD's foreground: Otsu's threshold of the grey image (ITU-R 601 weights), the object being
    the pixels above it (``bright``) or at most it (dark). No cleanup, as the released code.
    ``np.bool_ (H, W)``."""
    grey = np.rint(image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).astype(np.uint8)
    hist = np.bincount(grey.ravel(), minlength=256).astype(np.float64)
    p = hist / max(1.0, hist.sum())
    levels = np.arange(256, dtype=np.float64)
    omega = np.cumsum(p)
    mu = np.cumsum(p * levels)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * omega - mu) ** 2 / (omega * (1.0 - omega))
    between[~np.isfinite(between)] = -1.0
    t = int(np.argmax(between))  # pixels > t are the bright class
    return grey > t if bright else grey <= t


def grid_shuffle(image: np.ndarray, grid: int, rng: np.random.Generator) -> np.ndarray:
    """The image cut into ``grid`` x ``grid`` equal tiles, shuffled (the "structure" anomaly source
    of GLAD / MemSeg). A remainder that does not fill a tile stays in place."""
    h, w = image.shape[:2]
    th, tw = h // grid, w // grid
    if th == 0 or tw == 0:
        return image.copy()
    out = image.copy()
    body = image[: th * grid, : tw * grid]
    tiles = body.reshape(grid, th, grid, tw, -1).transpose(0, 2, 1, 3, 4).reshape(grid * grid, th, tw, -1)
    tiles = tiles[rng.permutation(grid * grid)]
    out[: th * grid, : tw * grid] = tiles.reshape(grid, grid, th, tw, -1).transpose(0, 2, 1, 3, 4).reshape(th * grid, tw * grid, -1)
    return out


def _resolve_region(
    image: np.ndarray,
    foreground: np.ndarray | None,
    restrict_to_foreground: bool | None,
    config_method: str,
    config_threshold: float,
) -> np.ndarray | None:
    """The allowed region for an anomaly, or None (anywhere).

    ``restrict_to_foreground`` False: anywhere. Otherwise a given ``foreground`` is used; else it is
    estimated when ``restrict_to_foreground`` is True (with the config method, "auto" if the config
    says "none") or when it is None and the config method is not "none".
    """
    if restrict_to_foreground is False:
        return None
    h, w = image.shape[:2]
    if foreground is not None:
        foreground = np.asarray(foreground)
        if foreground.shape != (h, w):
            raise ValueError(f"foreground must be (H, W) = {(h, w)}, got {foreground.shape}")
        return foreground.astype(bool, copy=False)
    if restrict_to_foreground or config_method != "none":
        method = config_method if config_method != "none" else "auto"
        return estimate_foreground(image, method=method, threshold=config_threshold)
    return None


def _normal_sample(image: np.ndarray) -> Sample:
    return image.copy(), np.zeros(image.shape[:2], dtype=bool), 0


# --------------------------------------------------------------------------------------------
# DRAEM synthesizer
# --------------------------------------------------------------------------------------------


def blend_texture(image: np.ndarray, texture: np.ndarray, mask: np.ndarray, beta: float) -> np.ndarray:
    """DRAEM sec. 3.3 blend: ``I' = (1 - M) I + (1 - beta) (M T) + beta (M I)``, uint8 in and out.

    Only the masked pixels are computed (float32, rounded to nearest); the others are copied, so
    the output equals ``image`` exactly outside ``mask``.
    """
    out = image.copy()
    sel = image[mask].astype(np.float32)  # K, 3
    tex = texture[mask].astype(np.float32)
    b = np.float32(beta)
    out[mask] = np.clip(np.rint((1.0 - b) * tex + b * sel), 0, 255).astype(np.uint8)
    return out


class PseudoAnomalySynthesizer:
    """DRAEM-style pseudo-anomalies: Perlin mask x augmented texture, blended (DRAEM sec. 3.3 blend);
    with ``structure_probability`` > 0 some sources are the shuffled image itself (GLAD).

    ``synth(image, rng, foreground=None, restrict_to_foreground=None) -> (image, mask, label)``:

    * ``image`` uint8 (H, W, 3); ``rng`` a ``numpy.random.Generator`` (all randomness comes from it);
    * ``foreground`` optional bool (H, W): the mask is intersected with it; an empty intersection
      is redrawn up to ``config.max_retries`` times, then the sample is returned normal;
    * ``restrict_to_foreground``: per-call switch for object vs texture classes (False: never
      restrict; True: restrict, estimating the foreground when none is given; None: the config's
      ``foreground`` setting decides).

    Returns the uint8 image (identical to the input outside the mask), the bool mask and the label
    (1 with a non-empty mask, else 0 with an empty mask).
    """

    def __init__(self, texture_source: TextureSource, config: SynthesisConfig | None = None):
        self.texture_source = texture_source
        self.config = config if config is not None else SynthesisConfig()

    def sample_mask(
        self, shape: tuple[int, int], rng: np.random.Generator, region: np.ndarray | None = None
    ) -> np.ndarray | None:
        """A Perlin mask (AND ``region``) of at least ``min_mask_fraction`` (>= 1 pixel), or None
        after ``max_retries`` failed draws."""
        cfg = self.config
        h, w = int(shape[0]), int(shape[1])
        if region is not None and not region.any():
            return None
        min_pixels = max(1, math.ceil(cfg.min_mask_fraction * h * w))
        for _ in range(int(cfg.max_retries)):
            res, angle = sample_perlin_params(
                rng, cfg.min_scale_exp, cfg.max_scale_exp, cfg.rotate, cfg.rotation_range
            )
            mask = perlin_noise((h, w), res, rng, angle=angle) > cfg.threshold
            if region is not None:
                mask &= region
            if np.count_nonzero(mask) >= min_pixels:
                return mask
        return None

    def __call__(
        self,
        image: np.ndarray,
        rng: np.random.Generator,
        foreground: np.ndarray | None = None,
        restrict_to_foreground: bool | None = None,
    ) -> Sample:
        image = _check_rgb(image)
        cfg = self.config
        if rng.random() >= cfg.anomaly_probability:
            return _normal_sample(image)
        region = _resolve_region(
            image, foreground, restrict_to_foreground, cfg.foreground, cfg.foreground_threshold
        )
        h, w = image.shape[:2]
        mask = self.sample_mask((h, w), rng, region)
        if mask is None:
            return _normal_sample(image)
        if cfg.structure_probability and rng.random() < cfg.structure_probability:
            texture = augment_texture(image, rng, cfg.texture_augmentations) if cfg.texture_augmentations else image
            texture = grid_shuffle(texture, int(cfg.structure_grid), rng)
        else:
            texture = self.texture_source.sample(rng, (h, w))
            if cfg.texture_augmentations:
                texture = augment_texture(texture, rng, cfg.texture_augmentations)
        beta = float(rng.uniform(*cfg.beta_range))
        return blend_texture(image, texture, mask, beta), mask, 1


# --------------------------------------------------------------------------------------------
# Semi-supervised: paste real anomalies
# --------------------------------------------------------------------------------------------


@dataclass
class PasteConfig:
    """Settings of :class:`RealAnomalyPaster` (INP-Former++ semi-supervised setting, after PRN).

    Attributes:
        anomaly_probability: chance that a sample gets a pasted anomaly (0.5, like the synthesizer,
            so mixing both keeps the normal fraction).
        per_component: each connected component of a mask is its own patch (else one patch per
            image: the bounding box of all its anomalous pixels, with their mask).
        min_component_pixels: smaller components are ignored.
        max_patches: patches pasted per sample ~ U{1..max_patches}.
        scale_range: random scale of a patch, relative to the target/source size ratio.
        flip, rotate90: random horizontal/vertical flips and multiples of 90 degrees.
        brightness, contrast: small colour jitter, factors ~ U(1 - j, 1 + j) (0 disables).
        foreground, foreground_threshold: as in :class:`SynthesisConfig`.
        min_foreground_overlap: with a foreground, a placement is kept when at least this fraction
            of the patch lands on it (the pasted mask is the patch mask AND the foreground).
        max_retries: placements tried per patch before giving up (no patch: a normal sample).
    """

    anomaly_probability: float = 0.5
    per_component: bool = True
    min_component_pixels: int = 4
    max_patches: int = 1
    scale_range: tuple[float, float] = (0.75, 1.25)
    flip: bool = True
    rotate90: bool = True
    brightness: float = 0.1
    contrast: float = 0.1
    foreground: str = "none"
    foreground_threshold: float = 30.0
    min_foreground_overlap: float = 0.5
    max_retries: int = 16

    def __post_init__(self):
        if not 0.0 <= float(self.anomaly_probability) <= 1.0:
            raise ValueError(f"anomaly_probability must be in [0, 1], got {self.anomaly_probability}")
        if int(self.max_patches) < 1:
            raise ValueError(f"max_patches must be >= 1, got {self.max_patches}")
        self.scale_range = _check_range("scale_range", self.scale_range, 1e-3, 1e3)
        for name in ("brightness", "contrast"):
            if not 0.0 <= float(getattr(self, name)) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        _check_foreground_method("foreground", self.foreground)
        if not 0.0 <= float(self.min_foreground_overlap) <= 1.0:
            raise ValueError(f"min_foreground_overlap must be in [0, 1], got {self.min_foreground_overlap}")
        if int(self.max_retries) < 1:
            raise ValueError(f"max_retries must be >= 1, got {self.max_retries}")

    @classmethod
    def from_dict(cls, params: Mapping | None) -> PasteConfig:
        """From a parameters mapping (lists -> tuples); unknown keys raise ``ValueError``."""
        return _from_dict(cls, params)


@dataclass
class _Patch:
    image: np.ndarray  # h, w, 3 uint8 (bounding box of the region)
    mask: np.ndarray  # h, w bool
    source_shape: tuple[int, int]  # (H, W) of the image it was cut from


class RealAnomalyPaster:
    """Semi-supervised mode of INP-Former++ (sec. 3.5, following PRN): cut the anomalous regions of
    a few labelled anomalous images, augment them (flip, rot90, scale, small colour jitter) and
    paste them at random places into normal images; the mask is the pasted region.

    Same call as :class:`PseudoAnomalySynthesizer`: ``paster(image, rng, foreground=None,
    restrict_to_foreground=None) -> (image, mask, label)``; pixels outside the returned mask are
    unchanged. A patch is scaled by the ratio of the target size to its source image size (the
    anomalous images are assumed to show the same field of view as the normal ones) times a random
    factor, and shrunk to fit when larger than the target.
    """

    def __init__(
        self,
        anomalous_images: Sequence[np.ndarray],
        masks: Sequence[np.ndarray],
        config: PasteConfig | None = None,
    ):
        self.config = config if config is not None else PasteConfig()
        if len(anomalous_images) != len(masks):
            raise ValueError(f"{len(anomalous_images)} anomalous images but {len(masks)} masks")
        self.patches: list[_Patch] = []
        for i, (img, msk) in enumerate(zip(anomalous_images, masks)):
            img = _check_rgb(img, f"anomalous_images[{i}]")
            msk = np.asarray(msk).astype(bool)
            if msk.shape != img.shape[:2]:
                raise ValueError(f"masks[{i}] has shape {msk.shape}, image has {img.shape[:2]}")
            self.patches.extend(self._cut(img, msk))
        if not self.patches:
            raise ValueError(
                "no anomalous region found in the given masks (all empty or below "
                f"min_component_pixels={self.config.min_component_pixels})"
            )

    def _cut(self, image: np.ndarray, mask: np.ndarray) -> list[_Patch]:
        ndimage = _ndimage()
        shape = image.shape[:2]
        if not self.config.per_component:
            if np.count_nonzero(mask) < self.config.min_component_pixels:
                return []
            slc = ndimage.find_objects(mask.astype(np.int32))[0]
            return [_Patch(image[slc].copy(), mask[slc].copy(), shape)]
        labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
        patches = []
        for k, slc in enumerate(ndimage.find_objects(labels), start=1):  # one per component
            region = labels[slc] == k
            if np.count_nonzero(region) >= self.config.min_component_pixels:
                patches.append(_Patch(image[slc].copy(), region, shape))
        return patches

    def _augment(self, patch: _Patch, rng: np.random.Generator, shape: tuple[int, int]):
        cfg = self.config
        img, msk = patch.image, patch.mask
        if cfg.flip:
            if rng.random() < 0.5:
                img, msk = img[:, ::-1], msk[:, ::-1]
            if rng.random() < 0.5:
                img, msk = img[::-1], msk[::-1]
        if cfg.rotate90:
            k = int(rng.integers(4))
            img, msk = np.rot90(img, k), np.rot90(msk, k)
        h, w = shape
        sh, sw = patch.source_shape
        s = float(rng.uniform(*cfg.scale_range))
        ph, pw = img.shape[:2]
        fy, fx = s * h / sh, s * w / sw
        fit = min(1.0, h / (ph * fy), w / (pw * fx))  # shrink to fit the target
        nh, nw = max(1, min(h, round(ph * fy * fit))), max(1, min(w, round(pw * fx * fit)))
        img, msk = np.ascontiguousarray(img), np.ascontiguousarray(msk)
        if (nh, nw) != (ph, pw):
            img = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BILINEAR))
            msk = np.asarray(Image.fromarray(msk.astype(np.uint8) * 255).resize((nw, nh), Image.NEAREST)) > 127
        if cfg.brightness or cfg.contrast:
            b = rng.uniform(1.0 - cfg.brightness, 1.0 + cfg.brightness)
            c = rng.uniform(1.0 - cfg.contrast, 1.0 + cfg.contrast)
            x = img.astype(np.float32) * np.float32(b)
            mean = np.float32(x[msk].mean()) if msk.any() else np.float32(x.mean())
            img = np.clip(np.rint(mean + np.float32(c) * (x - mean)), 0, 255).astype(np.uint8)
        return img, msk

    def __call__(
        self,
        image: np.ndarray,
        rng: np.random.Generator,
        foreground: np.ndarray | None = None,
        restrict_to_foreground: bool | None = None,
    ) -> Sample:
        image = _check_rgb(image)
        cfg = self.config
        if rng.random() >= cfg.anomaly_probability:
            return _normal_sample(image)
        region = _resolve_region(
            image, foreground, restrict_to_foreground, cfg.foreground, cfg.foreground_threshold
        )
        if region is not None and not region.any():
            return _normal_sample(image)
        h, w = image.shape[:2]
        fg_y, fg_x = np.nonzero(region) if region is not None else (None, None)
        out, mask = image.copy(), np.zeros((h, w), dtype=bool)
        for _ in range(int(rng.integers(1, cfg.max_patches + 1))):  # a few patches, not pixels
            patch = self.patches[int(rng.integers(len(self.patches)))]
            for _attempt in range(int(cfg.max_retries)):
                pimg, pmsk = self._augment(patch, rng, (h, w))
                ph, pw = pmsk.shape
                if region is None:
                    y0, x0 = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
                    placed = pmsk
                else:  # centre the patch on a random foreground pixel
                    j = int(rng.integers(len(fg_y)))
                    y0 = min(max(int(fg_y[j]) - ph // 2, 0), h - ph)
                    x0 = min(max(int(fg_x[j]) - pw // 2, 0), w - pw)
                    placed = pmsk & region[y0 : y0 + ph, x0 : x0 + pw]
                    if np.count_nonzero(placed) < cfg.min_foreground_overlap * np.count_nonzero(pmsk):
                        continue
                if not placed.any():
                    continue
                window = out[y0 : y0 + ph, x0 : x0 + pw]  # view into out
                window[placed] = pimg[placed]
                mask[y0 : y0 + ph, x0 : x0 + pw] |= placed
                break
        if not mask.any():
            return _normal_sample(image)
        return out, mask, 1


class MixedSynthesizer:
    """Picks one of several synthesizers per sample: ``MixedSynthesizer([(synth, p), (paster, q)])``
    uses ``synth`` with probability ``p / (p + q)``. Each component keeps its own
    ``anomaly_probability`` (the normal fraction is the weighted mean of theirs)."""

    def __init__(self, components: Sequence[tuple[Callable[..., Sample], float]]):
        components = list(components)
        if not components:
            raise ValueError("MixedSynthesizer needs at least one (synthesizer, weight) pair")
        self.synthesizers = [c for c, _ in components]
        weights = np.asarray([float(w) for _, w in components])
        if np.any(weights < 0) or weights.sum() <= 0:
            raise ValueError(f"weights must be non-negative with a positive sum, got {weights.tolist()}")
        self.weights = weights / weights.sum()

    def __call__(
        self,
        image: np.ndarray,
        rng: np.random.Generator,
        foreground: np.ndarray | None = None,
        restrict_to_foreground: bool | None = None,
    ) -> Sample:
        k = int(rng.choice(len(self.synthesizers), p=self.weights))
        return self.synthesizers[k](image, rng, foreground, restrict_to_foreground=restrict_to_foreground)


# --------------------------------------------------------------------------------------------
# Dataset hook
# --------------------------------------------------------------------------------------------


@dataclass
class SynthesisAugment:
    """Deterministic per-sample hook for ``uad.data.torch_data.AnomalyImageDataset(augment=...)``.

    ``augment(image_uint8 (H, W, 3), index) -> (image_uint8, mask_bool, label)`` draws its
    generator from ``np.random.default_rng([seed, epoch, index])``: the same seed, epoch and index
    give the same sample whatever the DataLoader worker or order; the dataset sets ``epoch`` so
    every epoch sees fresh anomalies.

    ``foreground_mode`` decides restriction on this path: ``"none"`` never restricts (the
    synthesizer's own ``foreground`` setting is overridden), ``"auto"`` / ``"threshold"`` estimate
    the object with :func:`estimate_foreground` for the indices selected by ``foreground_for``
    (a callable ``index -> bool`` or a collection of dataset indices, e.g. the rows whose class is
    an object class; None = every index).
    """

    synthesizer: Callable[..., Sample]
    seed: int
    foreground_mode: str = "none"
    foreground_for: Callable[[int], bool] | Collection[int] | None = None
    foreground_threshold: float = 30.0
    epoch: int = field(default=0)

    def __post_init__(self):
        _check_foreground_method("foreground_mode", self.foreground_mode)
        if isinstance(self.foreground_for, Collection) and not callable(self.foreground_for):
            self.foreground_for = frozenset(int(i) for i in self.foreground_for)

    def rng_for(self, index: int) -> np.random.Generator:
        """The generator of sample ``index`` in the current epoch."""
        return np.random.default_rng([int(self.seed), int(self.epoch), int(index)])

    def _restricted(self, index: int) -> bool:
        if self.foreground_mode == "none":
            return False
        if self.foreground_for is None:
            return True
        if callable(self.foreground_for):
            return bool(self.foreground_for(index))
        return int(index) in self.foreground_for

    def __call__(self, image: np.ndarray, index: int) -> Sample:
        rng = self.rng_for(index)
        if not self._restricted(index):
            return self.synthesizer(image, rng, None, restrict_to_foreground=False)
        fg = estimate_foreground(image, method=self.foreground_mode, threshold=self.foreground_threshold)
        return self.synthesizer(image, rng, fg, restrict_to_foreground=True)


# --------------------------------------------------------------------------------------------
# Preview
# --------------------------------------------------------------------------------------------


def _fit(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def preview_grid(
    samples: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    cell_size: tuple[int, int] | None = None,
    pad: int = 4,
) -> np.ndarray:
    """One row per ``(image, mask, synth_image)``: normal | mask | pseudo-anomalous | overlay
    (the pseudo-anomalous image with the mask contour in red). uint8 RGB (rows, 4 columns, white
    padding). Cells are ``cell_size`` (H, W), default the first image's size."""
    if not samples:
        raise ValueError("preview_grid needs at least one sample")
    ch, cw = cell_size if cell_size is not None else samples[0][0].shape[:2]
    n = len(samples)
    grid = np.full((n * ch + (n + 1) * pad, 4 * cw + 5 * pad, 3), 255, dtype=np.uint8)
    for r, (image, mask, synth) in enumerate(samples):
        image, synth = _check_rgb(image), _check_rgb(synth, "synth_image")
        m = np.zeros(image.shape[:2], bool) if mask is None else np.asarray(mask).astype(bool)
        if m.shape != (ch, cw):
            m = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((cw, ch), Image.NEAREST)) > 127
        image, synth = _fit(image, (ch, cw)), _fit(synth, (ch, cw))
        mask_rgb = np.repeat((m.astype(np.uint8) * 255)[..., None], 3, axis=2)
        overlay = synth.copy()
        contour = m & ~_erode3(m)
        overlay[_dilate3(contour) if ch >= 64 else contour] = (255, 0, 0)
        y = pad + r * (ch + pad)
        for c, cell in enumerate((image, mask_rgb, synth, overlay)):
            x = pad + c * (cw + pad)
            grid[y : y + ch, x : x + cw] = cell
    return grid
