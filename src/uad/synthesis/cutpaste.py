"""CutPaste pseudo anomalies (Li et al., CVPR 2021, sec. 3.1): a recipe of another family than DRAEM's.

A patch of the image itself is cut, colour-jittered and pasted back at another place:

- ``cutpaste``: a rectangle of area ratio ``U(0.02, 0.15)`` of the image and aspect ratio drawn
  log-uniformly in ``[0.3, 3.3]`` (the paper's ranges);
- ``scar``: a thin rectangle of width ``U(2, 16)`` and length ``U(10, 25)`` pixels, rotated by
  ``U(-45, 45)`` degrees (the paper's CutPaste-Scar);

each with the paper's colour jitter (brightness, contrast, saturation by a factor in ``[0.9, 1.1]``).
The paper's hue jitter is left out (no PIL primitive; a 0.1 hue shift is one of four jitters).

This project uses it where a pseudo anomaly must **not** come from the recipe a model trained on:
CostFilter-AD's calibrated blend (``uad.methods.costfilter.calibration``) chooses its weight on
held-out normals with CutPaste anomalies, since its filter learnt GLAD's Perlin / texture / grid
recipe and separates those far better than it separates real defects (measured: the method's README).

The callable has the synthesizers' interface (``(image_uint8 HxWx3, rng, foreground, restrict)``
-> ``(image_uint8, mask_bool, label)``): wrapped in :class:`~uad.synthesis.SynthesisAugment` it is
seeded per (seed, epoch, index). Outside the mask the output equals the input bit for bit; a mask
restricted to the object keeps the paste's pixels inside the object only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance

from uad.synthesis.synthesizer import Sample, _check_rgb, _resolve_region

__all__ = ["CutPasteConfig", "CutPasteSynthesizer"]


@dataclass(frozen=True)
class CutPasteConfig:
    """The paper's ranges (sec. 3.1 and its code's defaults), at the image's own pixel size."""

    scar_probability: float = 0.5
    area_ratio: tuple[float, float] = (0.02, 0.15)
    aspect_ratio: float = 3.3
    scar_width: tuple[int, int] = (2, 16)
    scar_length: tuple[int, int] = (10, 25)
    scar_rotation: float = 45.0
    jitter: float = 0.1
    max_retries: int = 20

    def __post_init__(self):
        if not 0.0 <= self.scar_probability <= 1.0:
            raise ValueError(f"scar_probability must be in [0, 1], got {self.scar_probability}")
        lo, hi = self.area_ratio
        if not 0.0 < lo <= hi < 1.0:
            raise ValueError(f"area_ratio must be 0 < low <= high < 1, got {self.area_ratio}")
        if self.aspect_ratio < 1.0:
            raise ValueError(f"aspect_ratio must be >= 1 (the range is [1/r, r]), got {self.aspect_ratio}")


class CutPasteSynthesizer:
    """Always makes an anomaly (label 1) unless no paste place fits ``max_retries`` times (then the
    image comes back normal, label 0, as the DRAEM synthesizer does with an empty mask)."""

    def __init__(self, config: CutPasteConfig | None = None):
        self.config = config if config is not None else CutPasteConfig()

    def _patch_size(self, h: int, w: int, rng: np.random.Generator) -> tuple[int, int]:
        cfg = self.config
        area = float(rng.uniform(*cfg.area_ratio)) * h * w
        aspect = math.exp(float(rng.uniform(-math.log(cfg.aspect_ratio), math.log(cfg.aspect_ratio))))
        ph = int(round(math.sqrt(area * aspect)))
        pw = int(round(math.sqrt(area / aspect)))
        return max(1, min(ph, h - 1)), max(1, min(pw, w - 1))

    def _jitter(self, patch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        j = float(self.config.jitter)
        img = Image.fromarray(patch)
        for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            img = enhancer(img).enhance(float(rng.uniform(1.0 - j, 1.0 + j)))
        return np.asarray(img)

    def _cut(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """The jittered patch and its own mask (all True but for a rotated scar's corners)."""
        cfg = self.config
        h, w = image.shape[:2]
        scar = rng.random() < cfg.scar_probability
        if scar:
            ph = int(rng.integers(cfg.scar_length[0], cfg.scar_length[1] + 1))
            pw = int(rng.integers(cfg.scar_width[0], cfg.scar_width[1] + 1))
            ph, pw = max(1, min(ph, h - 1)), max(1, min(pw, w - 1))
        else:
            ph, pw = self._patch_size(h, w, rng)
        top, left = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
        patch = self._jitter(np.ascontiguousarray(image[top:top + ph, left:left + pw]), rng)
        own = np.ones((ph, pw), dtype=bool)
        if scar:
            angle = float(rng.uniform(-cfg.scar_rotation, cfg.scar_rotation))
            patch = np.asarray(Image.fromarray(patch).rotate(angle, resample=Image.BILINEAR, expand=True))
            own = np.asarray(Image.fromarray(own.astype(np.uint8) * 255).rotate(angle, resample=Image.NEAREST,
                                                                                   expand=True)) > 127
            ph, pw = own.shape
            if ph >= h or pw >= w:  # a rotated scar wider than a tiny image: crop it to fit
                patch, own = patch[:h - 1, :w - 1], own[:h - 1, :w - 1]
        return patch, own

    def __call__(self, image: np.ndarray, rng: np.random.Generator, foreground: np.ndarray | None = None,
                 restrict_to_foreground: bool | None = None) -> Sample:
        image = _check_rgb(image)
        h, w = image.shape[:2]
        region = _resolve_region(image, foreground, restrict_to_foreground, "none", 30.0)
        if region is not None and not region.any():
            region = None  # no object found: anywhere, as an unrestricted class
        for _ in range(int(self.config.max_retries)):
            patch, own = self._cut(image, rng)
            ph, pw = own.shape
            top, left = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
            mask = np.zeros((h, w), dtype=bool)
            mask[top:top + ph, left:left + pw] = own
            if region is not None:
                mask &= region
            # a paste that equals what it covers (a flat area) is no anomaly: its pixels must change
            placed = np.zeros_like(image)
            placed[top:top + ph, left:left + pw] = patch
            mask &= (placed != image).any(axis=2)
            if mask.any():
                out = image.copy()
                out[mask] = placed[mask]
                return out, mask, 1
        return image.copy(), np.zeros((h, w), dtype=bool), 0
