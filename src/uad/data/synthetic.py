"""The embedded synthetic dataset: small, deterministic, MVTec-AD layout.

:func:`ensure_synthetic_dataset` writes, on first use only, a few hundred 128x128 PNGs::

    <root>/<class>/train/good/000.png ...
    <root>/<class>/test/good/000.png ...
    <root>/<class>/test/<defect>/000.png ...
    <root>/<class>/ground_truth/<defect>/000_mask.png     (0 / 255, mode L)
    <root>/.uad_synthetic.json                            (marker: generator version + params)

Classes (:data:`SYNTHETIC_CLASSES`) and their defect kinds (:data:`SYNTHETIC_DEFECTS`):

* ``fabric`` (texture): a plain-weave cloth. Normal variation: thread period, weave phase,
  a small rotation, per-thread brightness, two thread colours. Defects: ``hole`` (dark frayed
  blob), ``scratch`` (a thin pulled-thread line), ``stain`` (a soft coloured blob).
* ``wood`` (texture): growth rings warped by low-frequency noise plus grain streaks. Normal
  variation: ring period and phase, warp field, colour. Defects: ``hole``, ``scratch``, ``stain``.
* ``washer`` (object): a brushed metal ring on a plain background with a soft shadow and a
  printed orientation dot. Normal variation: position (about +-3 px), rotation (any angle),
  radius (+-2 %), light direction. Defects: ``scratch``, ``stain`` (oil), ``missing_part``
  (a bite out of the rim).
* ``pcb`` (object): a green board with an IC, resistors, a capacitor, a connector, traces and
  mounting holes. Normal variation: board position (+-2.5 px) and rotation (+-2 degrees),
  per-component sub-pixel jitter, colours. Defects: ``missing_part`` (a component absent, its
  copper pads visible), ``misplaced_part`` (a component shifted and/or turned; the mask is the
  union of where it should be and where it is), ``scratch``.

Every image, normal or not, then gets the same photometric jitter (global gain, per-channel
colour gain, a linear lighting gradient, sensor noise), so global statistics such as mean
brightness do not separate normal from anomalous images (a useless score sits near 0.5 AUROC),
while the defects are local structures a feature-reconstruction model can find.

Determinism: every image draws from its own ``numpy.random.default_rng`` seeded by
``(seed, class, split, defect, index)``; PNGs carry no timestamps, so the same parameters give
byte-identical files. Generation is written to a temporary sibling folder and renamed into place
atomically, with the marker written last; a marker that does not match the current generator
version and parameters makes the dataset regenerate. A non-empty ``root`` without our marker is
never overwritten (that is somebody's data).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

__all__ = [
    "GENERATOR_VERSION",
    "MARKER_NAME",
    "SYNTHETIC_CLASSES",
    "SYNTHETIC_DEFECTS",
    "ensure_synthetic_dataset",
    "render_sample",
]

#: Bump whenever the drawing code changes: existing datasets then regenerate.
GENERATOR_VERSION = 1
MARKER_NAME = ".uad_synthetic.json"

SYNTHETIC_DEFECTS: dict[str, tuple[str, ...]] = {
    "fabric": ("hole", "scratch", "stain"),
    "wood": ("hole", "scratch", "stain"),
    "washer": ("missing_part", "scratch", "stain"),
    "pcb": ("misplaced_part", "missing_part", "scratch"),
}
#: Class names, textures first then objects.
SYNTHETIC_CLASSES: tuple[str, ...] = tuple(SYNTHETIC_DEFECTS)

_SPLIT_CODE = {"train": 0, "test": 1}

# ---------------------------------------------------------------------------------------------
# drawing helpers (float images in [0, 1], shape (S, S, 3); all vectorised over pixels)
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``yy, xx`` (S, S) float64 (cached, read-only)."""
    ax = np.arange(size, dtype=np.float64) + 0.5
    yy, xx = np.meshgrid(ax, ax, indexing="ij")
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: tuple[int, int]) -> np.ndarray:
    """Band-limited noise (H, W), zero mean, unit-ish std: a random (cells) grid upsampled bicubic."""
    ch, cw = max(1, cells[0]), max(1, cells[1])
    low = rng.standard_normal((ch + 2, cw + 2)).astype(np.float32)
    h, w = shape
    # upsample the padded grid, then crop the middle so the borders are not special
    big = Image.fromarray(low).resize(
        (int(round(w * (cw + 2) / cw)), int(round(h * (ch + 2) / ch))), Image.BICUBIC
    )
    arr = np.asarray(big, dtype=np.float64)
    oy = (arr.shape[0] - h) // 2
    ox = (arr.shape[1] - w) // 2
    arr = arr[oy : oy + h, ox : ox + w]
    return (arr - arr.mean()) / (arr.std() + 1e-8)


def _rect_alpha(u: np.ndarray, v: np.ndarray, w: float, h: float) -> np.ndarray:
    """Anti-aliased coverage of an axis-aligned w x h rectangle centred at 0 in (u, v) coords."""
    return np.clip(w / 2 - np.abs(u) + 0.5, 0, 1) * np.clip(h / 2 - np.abs(v) + 0.5, 0, 1)


def _disc_alpha(u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    return np.clip(r - np.hypot(u, v) + 0.5, 0, 1)


def _rotate(u: np.ndarray, v: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = np.cos(angle), np.sin(angle)
    return c * u + s * v, -s * u + c * v


def _blend(img: np.ndarray, colour, alpha: np.ndarray) -> np.ndarray:
    """``img * (1 - alpha) + colour * alpha``, computed only inside the bounding box of
    ``alpha > 0`` and **in place** when ``img`` is writable (callers always reassign)."""
    rows = np.flatnonzero(alpha.any(axis=1))
    if rows.size == 0:
        return img
    cols = np.flatnonzero(alpha.any(axis=0))
    if not img.flags.writeable:
        img = img.copy()
    sl = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    patch = img[sl]
    patch += (np.asarray(colour, dtype=np.float64) - patch) * alpha[sl][..., None]
    return img


def _sample_point(rng: np.random.Generator, region: np.ndarray, margin: int) -> tuple[float, float]:
    """A random pixel centre (y, x) where ``region`` is true, ``margin`` px from the border."""
    r = region.copy()
    if margin > 0:
        r[:margin] = r[-margin:] = False
        r[:, :margin] = r[:, -margin:] = False
    idx = np.flatnonzero(r)
    if idx.size == 0:
        idx = np.flatnonzero(region)
    k = idx[rng.integers(idx.size)]
    y, x = divmod(int(k), region.shape[1])
    return y + 0.5 + rng.uniform(-0.5, 0.5), x + 0.5 + rng.uniform(-0.5, 0.5)


def _blob(rng, yy, xx, cy, cx, radius, roughness=0.35) -> np.ndarray:
    """Signed-ish field < 1 inside an irregular ellipse around (cy, cx)."""
    ang = rng.uniform(0, np.pi)
    ecc = rng.uniform(0.6, 1.0)
    u, v = _rotate(xx - cx, yy - cy, ang)
    d = np.hypot(u / radius, v / (radius * ecc))
    wobble = _smooth_noise(rng, yy.shape, (6, 6)) * roughness
    return d + wobble * np.clip(d, 0, 1.5)


def _polyline_distance(yy, xx, pts: np.ndarray) -> np.ndarray:
    """Distance (S, S) from every pixel centre to the polyline through ``pts`` (n, 2) as (y, x).
    Vectorised over pixels; the loop runs over the few segments."""
    best = None
    for (ay, ax), (by, bx) in zip(pts[:-1], pts[1:]):
        dy, dx = by - ay, bx - ax
        t = np.clip(((yy - ay) * dy + (xx - ax) * dx) / max(dy * dy + dx * dx, 1e-9), 0, 1)
        d = np.sqrt((yy - (ay + t * dy)) ** 2 + (xx - (ax + t * dx)) ** 2)
        best = d if best is None else np.minimum(best, d)
    return best


# ---------------------------------------------------------------------------------------------
# surface defects shared by all classes: (img, region, rng) -> (img, mask)
# ---------------------------------------------------------------------------------------------


def _scratch(img, region, rng, yy, xx, bright: bool | None = None):
    """A thin, slightly curved line (lighter or darker than the surface), clipped to ``region``."""
    size = img.shape[0]
    y0, x0 = _sample_point(rng, region > 0.9, margin=size // 8)
    length = rng.uniform(0.25, 0.45) * size
    ang = rng.uniform(0, 2 * np.pi)
    bend = rng.uniform(-0.15, 0.15) * length
    t = np.linspace(-0.5, 0.5, 12)
    along = t * length
    across = bend * (1 - (2 * t) ** 2)
    pts = np.stack(
        [y0 + along * np.sin(ang) + across * np.cos(ang), x0 + along * np.cos(ang) - across * np.sin(ang)],
        axis=1,
    )
    d = _polyline_distance(yy, xx, pts)
    width = rng.uniform(0.5, 1.0)
    alpha = np.clip(width - d + 0.5, 0, 1) * region
    if bright is None:
        bright = bool(rng.integers(2))
    target = np.clip(img + 0.35, 0, 1) if bright else img * 0.35
    strength = rng.uniform(0.6, 0.85)
    out = img * (1 - strength * alpha[..., None]) + target * (strength * alpha[..., None])
    mask = (d <= width + 1.0) & (region > 0.5)
    return out, mask


def _hole(img, region, rng, yy, xx):
    """A dark irregular blob with a frayed lighter rim."""
    size = img.shape[0]
    cy, cx = _sample_point(rng, region > 0.9, margin=size // 8)
    radius = rng.uniform(0.025, 0.055) * size
    f = _blob(rng, yy, xx, cy, cx, radius)
    inside = np.clip((1 - f) * radius + 0.5, 0, 1) * region
    rim = np.clip(1 - np.abs(f - 1.15) * 4, 0, 1) * region
    dark = np.array([0.05, 0.05, 0.06]) * rng.uniform(0.6, 1.6)
    out = img * (1 + 0.25 * rim[..., None])
    out = _blend(out, dark, inside)
    mask = (f < 1.0) & (region > 0.5)
    return out, mask


def _stain(img, region, rng, yy, xx):
    """A soft coloured blob multiplied into the surface."""
    size = img.shape[0]
    cy, cx = _sample_point(rng, region > 0.9, margin=size // 8)
    radius = rng.uniform(0.05, 0.1) * size
    f = _blob(rng, yy, xx, cy, cx, radius, roughness=0.25)
    alpha = np.clip((1.0 - f) * 3.0, 0, 1) * region
    hue = rng.integers(3)
    tint = [np.array([0.55, 0.35, 0.15]), np.array([0.35, 0.4, 0.15]), np.array([0.3, 0.3, 0.45])][hue]
    opacity = rng.uniform(0.45, 0.7)
    stained = img * tint * 1.3
    out = img * (1 - opacity * alpha[..., None]) + stained * (opacity * alpha[..., None])
    mask = (alpha > 0.3) & (region > 0.5)
    return out, mask


_SURFACE = {"scratch": _scratch, "hole": _hole, "stain": _stain}


def _surface_defect(kind, img, region, rng, yy, xx):
    """Apply a surface defect, retrying until its mask is big enough to matter."""
    for _ in range(20):
        out, mask = _SURFACE[kind](img, region, rng, yy, xx)
        if mask.sum() >= 8:
            return out, mask
    return out, mask


# ---------------------------------------------------------------------------------------------
# classes: (rng, size, defect or None) -> (float image (S, S, 3), bool mask (S, S))
# ---------------------------------------------------------------------------------------------


def _fabric(rng: np.random.Generator, size: int, defect: str | None):
    yy, xx = _grid(size)
    scale = size / 128.0
    period = rng.uniform(7.4, 8.6) * scale
    theta = rng.normal(0, 0.035)
    ou, ov = rng.uniform(0, 2 * period, size=2)
    u, v = _rotate(xx, yy, theta)
    u, v = u + ou, v + ov
    i, j = np.floor(u / period), np.floor(v / period)
    fu, fv = u / period - i, v / period - j
    over = (i + j) % 2 == 0  # warp (vertical thread) on top
    warp_prof = np.sin(np.pi * fu) ** 0.5
    weft_prof = np.sin(np.pi * fv) ** 0.5
    shade = np.where(over, warp_prof * (0.7 + 0.3 * np.sin(np.pi * fv)), weft_prof * (0.7 + 0.3 * np.sin(np.pi * fu)))
    k = 64
    gw = 1 + 0.05 * rng.standard_normal(k)
    gf = 1 + 0.05 * rng.standard_normal(k)
    gain = np.where(over, gw[i.astype(np.int64) % k], gf[j.astype(np.int64) % k])
    c_warp = np.array([0.32, 0.40, 0.58]) * (1 + rng.normal(0, 0.04, 3))
    c_weft = np.array([0.62, 0.64, 0.70]) * (1 + rng.normal(0, 0.04, 3))
    base = np.where(over[..., None], c_warp, c_weft)
    fibre = 0.04 * _smooth_noise(rng, (size, size), (size // 2, size // 2))
    img = base * (0.25 + 0.75 * shade * gain)[..., None] + fibre[..., None]
    mask = np.zeros((size, size), bool)
    if defect is not None:
        img, mask = _surface_defect(defect, img, np.ones((size, size)), rng, yy, xx)
    return img, mask


def _wood(rng: np.random.Generator, size: int, defect: str | None):
    yy, xx = _grid(size)
    scale = size / 128.0
    theta = rng.normal(0, 0.03)
    u, v = _rotate(xx, yy, theta)
    warp = _smooth_noise(rng, (size, size), (3, 3)) * rng.uniform(4, 7) * scale
    period = rng.uniform(9, 12) * scale
    phase = rng.uniform(0, 2 * np.pi)
    rings = (0.5 + 0.5 * np.sin(2 * np.pi * (v + warp + 0.04 * u) / period + phase)) ** 1.6
    streak = _smooth_noise(rng, (size, size), (4, max(8, size // 2)))  # long along x
    grain = rng.normal(0, 0.02, (size, size))
    c_light = np.array([0.80, 0.60, 0.40]) * (1 + rng.normal(0, 0.04, 3))
    c_dark = np.array([0.52, 0.33, 0.18]) * (1 + rng.normal(0, 0.04, 3))
    t = np.clip(0.65 * rings + 0.12 * streak + 0.2, 0, 1)[..., None]
    img = c_light * (1 - t) + c_dark * t + grain[..., None]
    mask = np.zeros((size, size), bool)
    if defect is not None:
        img, mask = _surface_defect(defect, img, np.ones((size, size)), rng, yy, xx)
    return img, mask


def _washer(rng: np.random.Generator, size: int, defect: str | None):
    yy, xx = _grid(size)
    cx, cy = size / 2 + rng.normal(0, 0.022 * size, 2)
    r_out = 0.34 * size * rng.uniform(0.98, 1.02)
    r_in = r_out * rng.uniform(0.44, 0.47)
    light = rng.uniform(-0.4, 0.4) - np.pi / 4
    dx, dy = xx - cx, yy - cy
    r = np.hypot(dx, dy)
    phi = np.arctan2(dy, dx)
    ring = np.clip(r_out - r + 0.5, 0, 1) * np.clip(r - r_in + 0.5, 0, 1)

    # background with a soft shadow of the ring
    bg_col = np.array([0.30, 0.32, 0.35]) * (1 + rng.normal(0, 0.03, 3))
    bg = np.broadcast_to(bg_col, (size, size, 3)) + 0.015 * _smooth_noise(rng, (size, size), (8, 8))[..., None]
    sr = np.hypot(dx - 0.03 * size, dy - 0.03 * size)
    shadow = np.clip((r_out + 0.03 * size - sr) / (0.04 * size), 0, 1) * np.clip((sr - r_in + 0.03 * size) / (0.04 * size), 0, 1)
    bg = bg * (1 - 0.35 * shadow[..., None])

    # brushed metal: circumferential streaks are a function of radius only
    t = np.clip((r - r_in) / (r_out - r_in), 0, 1)
    bevel = 0.78 + 0.22 * np.sin(np.pi * t)
    lit = 0.78 + 0.2 * np.cos(phi - light)
    radial = rng.standard_normal(size * 2)
    streaks = np.interp(r, np.linspace(0, size, size * 2), radial) * 0.035
    metal = np.array([0.74, 0.74, 0.77]) * (1 + rng.normal(0, 0.02, 3))
    metal_img = metal * (bevel * lit)[..., None] + streaks[..., None]
    # printed orientation dot: makes the rotation visible
    rot = rng.uniform(0, 2 * np.pi)
    r_mid = (r_in + r_out) / 2
    dot = _disc_alpha(xx - (cx + r_mid * np.cos(rot)), yy - (cy + r_mid * np.sin(rot)), 0.022 * size)
    metal_img = _blend(metal_img, [0.15, 0.15, 0.2], dot * 0.9)

    mask = np.zeros((size, size), bool)
    if defect == "missing_part":
        a = rot + rng.uniform(0.6, 2 * np.pi - 0.6)  # keep clear of the dot
        b = rng.uniform(0.06, 0.09) * size
        rc = r_out + rng.uniform(-0.1, 0.3) * b
        bite = _disc_alpha(xx - (cx + rc * np.cos(a)), yy - (cy + rc * np.sin(a)), b)
        mask = (ring > 0.5) & (bite > 0.5)
        ring = ring * (1 - bite)
    img = bg * (1 - ring[..., None]) + metal_img * ring[..., None]
    if defect in ("scratch", "stain"):
        region = np.clip(r_out - r - 1, 0, 1) * np.clip(r - r_in - 1, 0, 1)
        img, mask = _surface_defect(defect, img, region, rng, yy, xx)
    return img, mask


def _pcb_components(rng: np.random.Generator, size: int) -> list[dict]:
    """Component list in board coordinates (pixels, board centre at 0), with sub-pixel jitter."""
    s = size
    j = lambda: rng.normal(0, 0.35)  # noqa: E731 - per-component placement jitter in px
    comps = [
        dict(name="ic", shape="rect", u=-0.12 * s + j(), v=-0.03 * s + j(), w=0.19 * s, h=0.19 * s, angle=0.0,
             colour=[0.08, 0.08, 0.09], pins=True),
        dict(name="r1", shape="rect", u=0.15 * s + j(), v=-0.15 * s + j(), w=0.09 * s, h=0.04 * s, angle=0.0,
             colour=[0.78, 0.68, 0.48], bands=True),
        dict(name="r2", shape="rect", u=0.15 * s + j(), v=-0.05 * s + j(), w=0.09 * s, h=0.04 * s, angle=0.0,
             colour=[0.78, 0.68, 0.48], bands=True),
        dict(name="r3", shape="rect", u=0.15 * s + j(), v=0.05 * s + j(), w=0.09 * s, h=0.04 * s, angle=0.0,
             colour=[0.78, 0.68, 0.48], bands=True),
        dict(name="cap", shape="circle", u=0.27 * s + j(), v=0.14 * s + j(), w=0.09 * s, h=0.09 * s, angle=0.0,
             colour=[0.70, 0.72, 0.76]),
        dict(name="conn", shape="rect", u=-0.08 * s + j(), v=0.17 * s + j(), w=0.26 * s, h=0.06 * s, angle=0.0,
             colour=[0.88, 0.88, 0.84]),
    ]
    return comps


def _pcb_draw_component(img, u, v, c, size):
    """Draw component ``c`` into ``img`` (board coords u, v); returns (img, footprint alpha)."""
    lu, lv = _rotate(u - c["u"], v - c["v"], c["angle"])
    if c["shape"] == "circle":
        a = _disc_alpha(lu, lv, c["w"] / 2)
        rr = np.hypot(lu, lv) / (c["w"] / 2)
        shade = 0.75 + 0.25 * np.clip(1 - rr, 0, 1) - 0.1 * (lu + lv) / c["w"]
        col = np.asarray(c["colour"]) * shade[..., None]
        img = img * (1 - a[..., None]) + col * a[..., None]
        ring = np.clip(1 - np.abs(rr - 0.55) * 12, 0, 1) * a
        img = _blend(img, [0.35, 0.35, 0.4], ring * 0.6)
        return img, a
    a = _rect_alpha(lu, lv, c["w"], c["h"])
    foot = a
    col = np.broadcast_to(np.asarray(c["colour"], dtype=np.float64), img.shape)
    if c.get("bands"):
        band = (np.abs(lu) < c["w"] * 0.3) & (np.mod(lu + c["w"] * 0.3, c["w"] * 0.2) < c["w"] * 0.07)
        col = np.where(band[..., None], np.array([0.45, 0.2, 0.12]), col)
    img = img * (1 - a[..., None]) + col * a[..., None]
    if c.get("pins"):
        pitch = c["w"] / 6
        pin_band = _rect_alpha(lu, np.abs(lv) - (c["h"] / 2 + 0.025 * size), c["w"] * 0.9, 0.05 * size)
        teeth = (np.mod(lu + c["w"] / 2, pitch) > pitch * 0.45).astype(np.float64)
        pins = pin_band * teeth
        img = _blend(img, [0.75, 0.75, 0.72], pins)
        foot = np.maximum(foot, pin_band)
        # pin-1 dot
        dot = _disc_alpha(lu + c["w"] * 0.3, lv + c["h"] * 0.3, 0.018 * size)
        img = _blend(img, [0.35, 0.35, 0.35], dot * a)
    return img, foot


def _pcb_pads(img, u, v, c, size):
    """Copper pads under a component (visible when the component is missing or moved)."""
    copper = [0.78, 0.6, 0.3]
    lu, lv = _rotate(u - c["u"], v - c["v"], 0.0)
    if c["shape"] == "circle":
        pads = _rect_alpha(np.abs(lu) - c["w"] * 0.22, lv, c["w"] * 0.2, c["w"] * 0.3)
    elif c.get("pins"):
        pitch = c["w"] / 6
        band = _rect_alpha(lu, np.abs(lv) - (c["h"] / 2 + 0.025 * size), c["w"] * 0.9, 0.05 * size)
        pads = band * (np.mod(lu + c["w"] / 2, pitch) > pitch * 0.45)
    else:
        pads = _rect_alpha(np.abs(lu) - c["w"] * 0.42, lv, c["w"] * 0.24, c["h"] * 1.25)
    return _blend(img, copper, pads)


def _pcb(rng: np.random.Generator, size: int, defect: str | None):
    yy, xx = _grid(size)
    cx, cy = size / 2 + rng.normal(0, 0.02 * size, 2)
    angle = rng.normal(0, 0.035)
    u, v = _rotate(xx - cx, yy - cy, angle)  # board coordinates
    bw, bh = 0.74 * size, 0.54 * size
    board = _rect_alpha(u, v, bw, bh)

    bg = np.broadcast_to(np.array([0.16, 0.16, 0.19]) * (1 + rng.normal(0, 0.03, 3)), (size, size, 3))
    green = np.array([0.12, 0.42, 0.22]) * (1 + rng.normal(0, 0.04, 3))
    board_img = green * (1 + 0.04 * _smooth_noise(rng, (size, size), (16, 16)))[..., None]
    # traces: thin copper lines from the IC to the resistors and connector (under the mask: dim)
    trace_col = np.array([0.45, 0.5, 0.22])
    s = size
    for tv in (-0.15, -0.05, 0.05):
        board_img = _blend(board_img, trace_col, _rect_alpha(u - 0.02 * s, v - tv * s, 0.16 * s, 0.012 * s))
    for tu in (-0.16, -0.12, -0.08, -0.04, 0.0):
        board_img = _blend(board_img, trace_col, _rect_alpha(u - tu * s, v - 0.105 * s, 0.012 * s, 0.08 * s))
    board_img = _blend(board_img, trace_col, _rect_alpha(u - 0.27 * s, v + 0.02 * s, 0.012 * s, 0.24 * s))
    # mounting holes
    for hu, hv in ((-1, -1), (1, -1), (-1, 1), (1, 1)):
        hu_, hv_ = u - hu * 0.32 * s, v - hv * 0.22 * s
        board_img = _blend(board_img, [0.8, 0.65, 0.35], _disc_alpha(hu_, hv_, 0.03 * s))
        board_img = _blend(board_img, [0.05, 0.05, 0.05], _disc_alpha(hu_, hv_, 0.017 * s))
    # silkscreen marks
    board_img = _blend(board_img, [0.85, 0.85, 0.8], _rect_alpha(u + 0.22 * s, v + 0.2 * s, 0.09 * s, 0.012 * s))

    comps = _pcb_components(rng, size)
    for c in comps:
        board_img = _pcb_pads(board_img, u, v, c, size)

    mask = np.zeros((size, size), bool)
    target = None
    if defect in ("missing_part", "misplaced_part"):
        names = [c["name"] for c in comps]
        p = np.array([0.1, 0.2, 0.2, 0.2, 0.15, 0.15])
        target = names[rng.choice(len(names), p=p / p.sum())]
    for c in comps:
        if c["name"] == target and defect == "missing_part":
            _, foot = _pcb_draw_component(np.zeros_like(board_img), u, v, c, size)
            mask |= foot > 0.5
            continue
        if c["name"] == target and defect == "misplaced_part":
            _, foot0 = _pcb_draw_component(np.zeros_like(board_img), u, v, c, size)
            moved = dict(c)
            mode = rng.integers(3)  # 0 shift, 1 turn, 2 both
            if mode in (0, 2):
                d = rng.uniform(0.035, 0.06) * size
                a = rng.uniform(0, 2 * np.pi)
                moved["u"] += d * np.cos(a)
                moved["v"] += d * np.sin(a)
            if mode in (1, 2) or c["shape"] == "circle":
                moved["angle"] = rng.choice([-1, 1]) * rng.uniform(0.35, 1.2)
                if c["shape"] == "circle" and mode == 1:
                    d = rng.uniform(0.035, 0.06) * size
                    moved["u"] += d
            board_img, foot1 = _pcb_draw_component(board_img, u, v, moved, size)
            mask |= (foot0 > 0.5) | (foot1 > 0.5)
            continue
        board_img, _ = _pcb_draw_component(board_img, u, v, c, size)
    mask &= board > 0.5
    img = bg * (1 - board[..., None]) + board_img * board[..., None]
    if defect == "scratch":
        region = np.clip(_rect_alpha(u, v, bw - 4, bh - 4), 0, 1)
        img, mask = _surface_defect("scratch", img, region, rng, yy, xx)
    return img, mask


_RENDERERS: dict[str, Callable] = {"fabric": _fabric, "wood": _wood, "washer": _washer, "pcb": _pcb}


def _photometric(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Normal acquisition variation: gain, colour gain, lighting gradient, sensor noise."""
    size = img.shape[0]
    yy, xx = _grid(size)
    gain = rng.uniform(0.88, 1.12) * (1 + rng.normal(0, 0.025, 3))
    g = rng.uniform(0, 0.12)
    a = rng.uniform(0, 2 * np.pi)
    lighting = 1 + g * ((xx - size / 2) * np.cos(a) + (yy - size / 2) * np.sin(a)) / size
    out = img * gain * lighting[..., None] + rng.normal(0, 0.012, img.shape)
    return np.clip(out * 255 + 0.5, 0, 255).astype(np.uint8)


def render_sample(
    class_name: str, defect: str | None, seed: int, index: int, split: str = "test", image_size: int = 128
) -> tuple[np.ndarray, np.ndarray]:
    """Render one sample: ``uint8 (S, S, 3)`` image and ``bool (S, S)`` mask (all False if normal).

    ``defect`` is ``None`` (or ``"good"``) for a normal image, else one of
    ``SYNTHETIC_DEFECTS[class_name]``. Pure function of its arguments.
    """
    if class_name not in _RENDERERS:
        raise ValueError(f"unknown synthetic class {class_name!r}; expected one of {list(SYNTHETIC_CLASSES)}")
    if defect == "good":
        defect = None
    if defect is not None and defect not in SYNTHETIC_DEFECTS[class_name]:
        raise ValueError(f"unknown defect {defect!r} for {class_name!r}; expected {SYNTHETIC_DEFECTS[class_name]}")
    cls_code = SYNTHETIC_CLASSES.index(class_name)
    def_code = 0 if defect is None else 1 + SYNTHETIC_DEFECTS[class_name].index(defect)
    rng = np.random.default_rng([int(seed), cls_code, _SPLIT_CODE[split], def_code, int(index), int(image_size)])
    img, mask = _RENDERERS[class_name](rng, int(image_size), defect)
    return _photometric(img, rng), mask


# ---------------------------------------------------------------------------------------------
# writing the dataset
# ---------------------------------------------------------------------------------------------


def _save_png(path: Path, arr: np.ndarray) -> None:
    Image.fromarray(arr).save(path, format="PNG", compress_level=1)


def _expected_marker(params: dict) -> dict:
    n_per_class = params["n_train"] + params["n_test_good"]
    n_files = 0
    for c in params["classes"]:
        n_def = len(SYNTHETIC_DEFECTS[c]) * params["n_test_bad_per_defect"]
        n_files += n_per_class + 2 * n_def  # images + masks
    return {"generator": "uad.data.synthetic", "generator_version": GENERATOR_VERSION, "params": params,
            "n_files": n_files}


def _read_marker(root: Path) -> dict | None:
    try:
        return json.loads((root / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


def _is_complete(root: Path, expected: dict) -> bool:
    marker = _read_marker(root)
    if marker != expected:
        return False
    n = sum(1 for p in root.rglob("*.png") if p.is_file())
    return n == expected["n_files"]


def _generate_into(tmp: Path, params: dict) -> None:
    size, seed = params["image_size"], params["seed"]
    for c in params["classes"]:
        d = tmp / c / "train" / "good"
        d.mkdir(parents=True)
        for i in range(params["n_train"]):
            img, _ = render_sample(c, None, seed, i, "train", size)
            _save_png(d / f"{i:03d}.png", img)
        d = tmp / c / "test" / "good"
        d.mkdir(parents=True)
        for i in range(params["n_test_good"]):
            img, _ = render_sample(c, None, seed, i, "test", size)
            _save_png(d / f"{i:03d}.png", img)
        for defect in SYNTHETIC_DEFECTS[c]:
            d = tmp / c / "test" / defect
            g = tmp / c / "ground_truth" / defect
            d.mkdir(parents=True)
            g.mkdir(parents=True)
            for i in range(params["n_test_bad_per_defect"]):
                img, mask = render_sample(c, defect, seed, i, "test", size)
                _save_png(d / f"{i:03d}.png", img)
                _save_png(g / f"{i:03d}_mask.png", mask.astype(np.uint8) * 255)


def ensure_synthetic_dataset(
    root: str | os.PathLike,
    seed: int = 0,
    image_size: int = 128,
    n_train: int = 32,
    n_test_good: int = 10,
    n_test_bad_per_defect: int = 5,
    classes: tuple[str, ...] | list[str] | None = None,
) -> Path:
    """Make sure the synthetic MVTec-layout dataset exists at ``root``; return ``root`` as a Path.

    Writes it only when missing or when its marker (generator version + parameters) differs
    from the requested one; otherwise returns at once. Defaults give 4 classes x (32 train +
    10 good + 15 defective test images) of 128 x 128 in about a second.

    Raises ``FileExistsError`` when ``root`` is a non-empty folder that is not a synthetic
    dataset (it is never deleted).
    """
    root = Path(root).expanduser().absolute()
    classes = tuple(SYNTHETIC_CLASSES if classes is None else classes)
    unknown = [c for c in classes if c not in SYNTHETIC_DEFECTS]
    if unknown or not classes:
        raise ValueError(f"unknown synthetic classes {unknown}; expected a non-empty subset of {list(SYNTHETIC_CLASSES)}")
    for name, val in (("n_train", n_train), ("n_test_good", n_test_good),
                      ("n_test_bad_per_defect", n_test_bad_per_defect)):
        if int(val) < 1:
            raise ValueError(f"{name} must be >= 1, got {val}")
    if int(image_size) < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    params = {
        "seed": int(seed), "image_size": int(image_size), "n_train": int(n_train),
        "n_test_good": int(n_test_good), "n_test_bad_per_defect": int(n_test_bad_per_defect),
        "classes": list(classes),
    }
    expected = _expected_marker(params)
    if _is_complete(root, expected):
        return root

    def _replaceable(p: Path) -> bool:
        return (not p.exists()) or (p.is_dir() and (not any(p.iterdir()) or (p / MARKER_NAME).exists()))

    if not _replaceable(root):
        raise FileExistsError(
            f"{root} exists and is not a uad synthetic dataset (no {MARKER_NAME}); refusing to overwrite it"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = root.parent / f".{root.name}.tmp-{tag}"
    try:
        _generate_into(tmp, params)
        (tmp / MARKER_NAME).write_text(json.dumps(expected, indent=2, sort_keys=True))
        if root.exists():
            if _is_complete(root, expected):  # another process finished first
                return root
            trash = root.parent / f".{root.name}.old-{tag}"
            os.rename(root, trash)  # stale version of ours (checked above) or an empty folder
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.rename(tmp, root)
        except OSError:
            if _is_complete(root, expected):  # lost a race to an identical writer
                return root
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root
