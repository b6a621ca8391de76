"""Vectorised 2-D Perlin noise and the DRAEM anomaly mask built from it.

DRAEM (Zavrtanik et al., ICCV 2021, sec. 3.3) draws its anomaly shapes from Perlin noise
(Perlin, SIGGRAPH 1985): gradient noise on a lattice whose number of cells per axis is a random
power of two ``2**k``, ``k ~ U{0, ..., 5}`` independently for each axis, the noise image is rotated
by a random angle in [-90, 90] degrees and thresholded at 0.5 to a binary mask. INP-Former++
(eq. 7-8, "similar to DRAEM we utilize Perlin noise and DTD textures") and GLAD / CostFilter-AD
use the same recipe.

Implementation notes
--------------------
* The noise is a continuous function of the lattice coordinates, so it is *evaluated* where it is
  needed instead of generated on a grid and resampled. This gives three things for free:

  - shapes that are not divisible by the lattice resolution: the lattice is laid over the padded
    size ``ceil(H / ry) * ry`` and the first ``H`` rows are evaluated, which is exactly "generate at
    the padded size and crop";
  - rotation without an interpolation pass: each output pixel is mapped back through the inverse
    rotation about the image centre and the noise is evaluated there. Like DRAEM's image rotation
    with a constant zero fill, points whose source lies outside the un-rotated ``H x W`` noise
    image get the value 0 (so the corners of a rotated mask never hold an anomaly, as in DRAEM);
  - no Python loop over pixels: every step is a whole-array numpy operation (float32).

* Each lattice corner carries a unit gradient ``(cos a, sin a)``, ``a ~ U[0, 2 pi)``. The value at
  a point is the fade-weighted (``6t^5 - 15t^4 + 10t^3``) bilinear blend of the four corner dot
  products, scaled by ``sqrt(2)`` so the range is about [-1, 1] (the DRAEM convention, which is
  what makes the 0.5 threshold meaningful).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["fade", "perlin_noise", "perlin_mask", "sample_perlin_params"]

_SQRT2 = np.float32(math.sqrt(2.0))


def fade(t: np.ndarray) -> np.ndarray:
    """Perlin's quintic fade curve ``6t^5 - 15t^4 + 10t^3`` (C2-continuous at cell borders)."""
    r = t * 6.0
    r -= 15.0
    r *= t
    r += 10.0
    r *= t
    r *= t
    r *= t
    return r


def _check_shape(shape) -> tuple[int, int]:
    if len(shape) != 2:
        raise ValueError(f"shape must be (H, W), got {shape!r}")
    h, w = int(shape[0]), int(shape[1])
    if h <= 0 or w <= 0:
        raise ValueError(f"shape must be positive, got {shape!r}")
    return h, w


def _check_res(res) -> tuple[int, int]:
    if len(res) != 2:
        raise ValueError(f"res must be (ry, rx), got {res!r}")
    ry, rx = int(res[0]), int(res[1])
    if ry <= 0 or rx <= 0:
        raise ValueError(f"res must be positive, got {res!r}")
    return ry, rx


def _evaluate(y: np.ndarray, x: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """Perlin noise at lattice coordinates ``(y, x)`` (broadcastable float32 arrays).

    ``angles`` (ry + 1, rx + 1) are the gradient directions of the lattice corners. Coordinates must
    lie in ``[0, ry] x [0, rx]``; they are clamped into the last cell for safety.
    """
    ry, rx = angles.shape[0] - 1, angles.shape[1] - 1
    stride = rx + 1
    gy = np.sin(angles).astype(np.float32).ravel()
    gx = np.cos(angles).astype(np.float32).ravel()

    iy = np.clip(np.floor(y), 0, ry - 1)
    ix = np.clip(np.floor(x), 0, rx - 1)
    fy = (y - iy).astype(np.float32)  # position inside the cell, in [0, 1]
    fx = (x - ix).astype(np.float32)
    idx = iy.astype(np.intp) * stride + ix.astype(np.intp)  # (H, W) corner (0, 0) of each cell
    idx = np.broadcast_to(idx, np.broadcast_shapes(np.shape(fy), np.shape(fx)))

    fy1 = fy - np.float32(1.0)
    fx1 = fx - np.float32(1.0)
    # dot(gradient of corner, offset from corner) for the four corners of the cell
    n00 = gy[idx] * fy + gx[idx] * fx
    i = idx + 1
    n01 = gy[i] * fy + gx[i] * fx1
    i = idx + stride
    n10 = gy[i] * fy1 + gx[i] * fx
    i += 1
    n11 = gy[i] * fy1 + gx[i] * fx1

    u = fade(fx)
    v = fade(fy)
    # in-place lerps (no temporaries): top = n00 + u (n01 - n00), bottom likewise, then along y
    n01 -= n00
    n01 *= u
    n00 += n01  # top
    n11 -= n10
    n11 *= u
    n10 += n11  # bottom
    n10 -= n00
    n10 *= v
    n00 += n10
    n00 *= _SQRT2
    return n00.astype(np.float32, copy=False)


def perlin_noise(
    shape: tuple[int, int],
    res: tuple[int, int],
    rng: np.random.Generator,
    angle: float = 0.0,
) -> np.ndarray:
    """2-D Perlin noise of ``shape`` with ``res = (ry, rx)`` lattice cells per axis, float32 in ~[-1, 1].

    Any ``shape`` works: the lattice spans the padded size ``(ceil(H/ry)*ry, ceil(W/rx)*rx)`` and the
    top-left ``H x W`` window is returned (generate-padded-then-crop, without building the padding).

    ``angle`` (degrees) rotates the noise image about its centre, like DRAEM's rotation of the
    generated noise; points whose pre-image falls outside the ``H x W`` image are 0 (DRAEM's
    constant zero fill). Draws ``(ry + 1) * (rx + 1)`` uniform gradient angles from ``rng``.
    """
    h, w = _check_shape(shape)
    ry, rx = _check_res(res)
    angles = rng.uniform(0.0, 2.0 * math.pi, size=(ry + 1, rx + 1))
    # lattice units per pixel on the padded grid
    sy = np.float32(ry / (math.ceil(h / ry) * ry))
    sx = np.float32(rx / (math.ceil(w / rx) * rx))
    rows = np.arange(h, dtype=np.float32)
    cols = np.arange(w, dtype=np.float32)
    if angle == 0.0:
        # separable coordinates: (H, 1) and (1, W) broadcast to (H, W)
        return _evaluate((rows * sy)[:, None], (cols * sx)[None, :], angles)

    # inverse rotation about the image centre: output pixel p takes the value at R^-1 (p - c) + c
    # sign chosen so that the result matches scipy.ndimage.rotate(noise, angle, reshape=False)
    theta = -math.radians(angle)
    cos_t, sin_t = np.float32(math.cos(theta)), np.float32(math.sin(theta))
    cy, cx = np.float32((h - 1) / 2.0), np.float32((w - 1) / 2.0)
    dy = (rows - cy)[:, None]  # H, 1
    dx = (cols - cx)[None, :]  # 1, W
    src_y = cos_t * dy - sin_t * dx + cy  # H, W
    src_x = sin_t * dy + cos_t * dx + cx
    inside = (src_y > -0.5) & (src_y < h - 0.5) & (src_x > -0.5) & (src_x < w - 0.5)
    # clamp so pixels just outside evaluate safely; they are zeroed below
    src_y = np.clip(src_y, 0.0, h - 1.0)
    src_x = np.clip(src_x, 0.0, w - 1.0)
    noise = _evaluate(src_y * sy, src_x * sx, angles)
    noise[~inside] = 0.0
    return noise


def sample_perlin_params(
    rng: np.random.Generator,
    min_scale_exp: int = 0,
    max_scale_exp: int = 6,
    rotate: bool = True,
    rotation_range: tuple[float, float] = (-90.0, 90.0),
) -> tuple[tuple[int, int], float]:
    """Draw DRAEM's random lattice resolution and rotation: ``((2**ky, 2**kx), angle_degrees)``.

    ``ky, kx ~ U{min_scale_exp, ..., max_scale_exp - 1}`` independently (DRAEM: 2^[0..6)),
    ``angle ~ U[rotation_range]`` when ``rotate`` (DRAEM: [-90, 90]) else 0.
    """
    if not 0 <= min_scale_exp < max_scale_exp:
        raise ValueError(
            f"need 0 <= min_scale_exp < max_scale_exp, got {min_scale_exp}, {max_scale_exp}"
        )
    ky, kx = rng.integers(min_scale_exp, max_scale_exp, size=2)
    angle = float(rng.uniform(*rotation_range)) if rotate else 0.0
    return (int(2**ky), int(2**kx)), angle


def perlin_mask(
    shape: tuple[int, int],
    rng: np.random.Generator,
    min_scale_exp: int = 0,
    max_scale_exp: int = 6,
    threshold: float = 0.5,
    rotate: bool = True,
    rotation_range: tuple[float, float] = (-90.0, 90.0),
    max_tries: int = 32,
) -> np.ndarray:
    """DRAEM's binary anomaly mask: thresholded, randomly scaled and rotated Perlin noise.

    Returns ``np.bool_ (H, W)`` = ``noise > threshold``. An empty draw is redrawn (new scales,
    angle and gradients) up to ``max_tries`` times, so the mask is non-empty unless the threshold
    makes that (nearly) impossible (the noise never exceeds 1); after ``max_tries`` empty draws the
    empty mask is returned and the caller decides (the synthesizer then returns a normal sample,
    which is what DRAEM does with an empty mask).
    """
    h, w = _check_shape(shape)
    mask = np.zeros((h, w), dtype=bool)
    for _ in range(max(1, int(max_tries))):
        res, angle = sample_perlin_params(rng, min_scale_exp, max_scale_exp, rotate, rotation_range)
        mask = perlin_noise((h, w), res, rng, angle=angle) > threshold
        if mask.any():
            return mask
    return mask
