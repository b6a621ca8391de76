"""Texture sources for pseudo-anomalies and DRAEM's texture augmentation.

DRAEM (Zavrtanik et al., ICCV 2021, sec. 3.3) fills its Perlin masks with images from the
Describable Textures Dataset (DTD, Cimpoi et al. 2014), each resized to the training image size
and augmented by three augmenters drawn at random, without replacement, from a fixed list
(:data:`TEXTURE_AUGMENTERS`). INP-Former++ (sec. 3.5, residual learning) and GLAD (followed by
CostFilter-AD) use the same textures.

Every source here has one interface, ``sample(rng, size=(H, W)) -> np.uint8 (H, W, 3)``, and
draws all its randomness from the ``rng`` it is given, so a sample depends only on that generator
(caches change the speed, never the result):

* :class:`DTDTextureSource`: the DTD folder in its published layout ``<root>/images/<category>/*.jpg``.
* :class:`SelfTextureSource`: augmented random crops of the training images (no download needed;
  the in-distribution fallback used by GLAD-style pipelines when DTD is absent).
* :class:`ProceduralTextureSource`: procedural textures (fractal Perlin noise, stripes,
  checkerboards, cells, gradients) in random colours.
* :class:`MixedTextureSource`: a weighted mixture of the above.

:func:`make_texture_source` builds one by name and returns a description to record as a run
tag. It never falls back silently: ``kind="dtd"`` with a bad path raises
:class:`TextureSourceError`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps, UnidentifiedImageError

from uad.errors import UadError
from uad.synthesis.perlin import perlin_noise

__all__ = [
    "TEXTURE_AUGMENTERS",
    "TEXTURE_KINDS",
    "DTDTextureSource",
    "MixedTextureSource",
    "ProceduralTextureSource",
    "SelfTextureSource",
    "TextureSource",
    "TextureSourceError",
    "augment_texture",
    "make_texture_source",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
TEXTURE_KINDS = ("dtd", "self", "procedural", "fallback")
_DTD_HINT = (
    "expected the DTD layout <root>/images/<category>/*.jpg (root may also be the dtd/ or "
    "dtd/images folder); DTD: https://www.robots.ox.ac.uk/~vgg/data/dtd/"
)


class TextureSourceError(UadError, RuntimeError):
    """A texture source cannot be used; the message names the offending path."""

    def __init__(self, message: str, path: str | Path | None = None):
        super().__init__(message)
        self.path = None if path is None else Path(path)


class TextureSource:
    """Interface: ``sample(rng, size) -> np.uint8 (H, W, 3)``; ``describe() -> str``."""

    def sample(self, rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__


def _check_size(size) -> tuple[int, int]:
    h, w = int(size[0]), int(size[1])
    if h <= 0 or w <= 0:
        raise ValueError(f"texture size must be positive (H, W), got {size!r}")
    return h, w


def _check_rgb(image: np.ndarray, what: str = "image") -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{what} must be np.uint8 (H, W, 3), got {image.dtype} {image.shape}")
    return image


# --------------------------------------------------------------------------------------------
# DRAEM's texture augmentation: 3 augmenters drawn from 10, applied in the drawn order.
# Each works on a PIL RGB image (C implementations, no per-pixel Python) with parameters drawn
# from `rng`; ranges are DRAEM's (imgaug defaults where DRAEM gives none).
# --------------------------------------------------------------------------------------------

_RAMP = np.arange(256, dtype=np.float64)


def _lut(values: np.ndarray) -> list[int]:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8).tolist()


def _aug_gamma(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Gamma contrast, gamma ~ U(0.5, 2) per channel: ``255 * (x / 255) ** gamma``."""
    gammas = rng.uniform(0.5, 2.0, size=3)
    lut = 255.0 * (_RAMP[None, :] / 255.0) ** gammas[:, None]  # 3, 256
    return im.point(_lut(lut.ravel()))


def _aug_brightness(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Multiply and add to brightness: luma ``Y * U(0.8, 1.2) + U(-30, 30)`` in YCbCr."""
    mul, add = rng.uniform(0.8, 1.2), rng.uniform(-30.0, 30.0)
    y, cb, cr = im.convert("YCbCr").split()
    y = y.point(_lut(_RAMP * mul + add))
    return Image.merge("YCbCr", (y, cb, cr)).convert("RGB")


def _aug_sharpness(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """PIL sharpness enhancement, factor ~ U(0, 2) (0 = blurred, 1 = unchanged, 2 = sharpened)."""
    return ImageEnhance.Sharpness(im).enhance(float(rng.uniform(0.0, 2.0)))


def _aug_hue_saturation(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Add U(-50, 50) to hue (cyclic, 0-255 scale) and, independently, to saturation (clipped)."""
    dh, ds = rng.uniform(-50.0, 50.0, size=2)
    h, s, v = im.convert("HSV").split()
    h = h.point(np.mod(np.rint(_RAMP + dh), 256).astype(np.uint8).tolist())
    s = s.point(_lut(_RAMP + ds))
    return Image.merge("HSV", (h, s, v)).convert("RGB")


def _aug_solarize(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """With probability 0.5, invert values >= threshold, threshold ~ U{32..128}."""
    apply, threshold = rng.random() < 0.5, int(rng.integers(32, 129))
    if not apply:
        return im
    return ImageOps.solarize(im, threshold=threshold)


def _aug_posterize(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Keep the ``bits ~ U{1..8}`` most significant bits of each channel."""
    return ImageOps.posterize(im, int(rng.integers(1, 9)))


def _aug_invert(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """``255 - x``."""
    return ImageOps.invert(im)


def _aug_autocontrast(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """PIL autocontrast, cutoff ~ U{0..20} percent of the histogram at each end."""
    return ImageOps.autocontrast(im, cutoff=int(rng.integers(0, 21)))


def _aug_equalize(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """PIL histogram equalisation."""
    return ImageOps.equalize(im)


def _aug_rotate(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Affine rotation by U(-45, 45) degrees about the centre, bilinear, black fill."""
    return im.rotate(float(rng.uniform(-45.0, 45.0)), resample=Image.BILINEAR, fillcolor=(0, 0, 0))


#: DRAEM's ten texture augmenters, in DRAEM's order: (name, function(PIL image, rng)).
TEXTURE_AUGMENTERS: tuple[tuple[str, Callable[[Image.Image, np.random.Generator], Image.Image]], ...] = (
    ("gamma_contrast", _aug_gamma),
    ("brightness", _aug_brightness),
    ("sharpness", _aug_sharpness),
    ("hue_saturation", _aug_hue_saturation),
    ("solarize", _aug_solarize),
    ("posterize", _aug_posterize),
    ("invert", _aug_invert),
    ("autocontrast", _aug_autocontrast),
    ("equalize", _aug_equalize),
    ("rotate", _aug_rotate),
)


def augment_texture(
    texture: np.ndarray, rng: np.random.Generator, n_augmentations: int = 3
) -> np.ndarray:
    """DRAEM's texture augmentation: ``n_augmentations`` (3) distinct augmenters drawn at random
    from :data:`TEXTURE_AUGMENTERS`, applied in the drawn order. uint8 (H, W, 3) in and out."""
    texture = _check_rgb(texture, "texture")
    n = int(n_augmentations)
    if n <= 0:
        return texture.copy()
    if n > len(TEXTURE_AUGMENTERS):
        raise ValueError(f"n_augmentations must be <= {len(TEXTURE_AUGMENTERS)}, got {n}")
    chosen = rng.choice(len(TEXTURE_AUGMENTERS), size=n, replace=False)
    im = Image.fromarray(texture)
    for k in chosen:
        im = TEXTURE_AUGMENTERS[int(k)][1](im, rng)
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


# --------------------------------------------------------------------------------------------
# DTD
# --------------------------------------------------------------------------------------------


class _LRU:
    """A small bounded least-recently-used cache (key -> read-only array)."""

    def __init__(self, capacity: int):
        self.capacity = max(0, int(capacity))
        self._data: OrderedDict = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key):
        value = self._data.get(key)
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        self._data.move_to_end(key)
        return value

    def put(self, key, value) -> None:
        if self.capacity == 0:
            return
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.capacity:
            self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


def _resolve_dtd_images_dir(root: str | Path) -> Path:
    root = Path(root).expanduser()
    if not root.exists():
        raise TextureSourceError(f"DTD texture folder not found: {root} ({_DTD_HINT})", root)
    if not root.is_dir():
        raise TextureSourceError(f"DTD texture path is not a folder: {root} ({_DTD_HINT})", root)
    for candidate in (root / "images", root / "dtd" / "images"):
        if candidate.is_dir():
            return candidate
    return root  # root is dtd/images itself (category folders) or a flat folder of textures


def _read_rgb(path: Path, size: tuple[int, int]) -> np.ndarray:
    """Decode ``path`` to RGB and resize the whole image to ``size`` (H, W), bilinear (as DRAEM)."""
    h, w = size
    try:
        with Image.open(path) as im:
            # JPEG: let the decoder downscale by 1/2, 1/4, 1/8 while staying >= the target size
            im.draft("RGB", (w, h))
            im = im.convert("RGB")
            if im.size != (w, h):
                im = im.resize((w, h), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise TextureSourceError(f"cannot read texture image {path}: {exc}", path) from exc


class DTDTextureSource(TextureSource):
    """Textures from the Describable Textures Dataset, as DRAEM uses them.

    ``root`` may be the folder holding ``dtd/``, the ``dtd/`` folder (``<root>/images/<cat>/*.jpg``)
    or ``dtd/images`` itself; all ``.jpg/.jpeg/.png`` below the images folder are used, sorted by
    path so a seed picks the same file on every machine. ``sample`` picks one uniformly, resizes the
    whole image to the requested size (DRAEM resizes, it does not crop) and returns a fresh copy.

    Decoded and resized textures are kept in a bounded LRU (``cache_size`` entries, about
    ``H * W * 3`` bytes each: 256 entries at 256x256 are 50 MB). Errors are
    :class:`TextureSourceError` naming the path: missing or empty folder at construction, an
    unreadable image when it is sampled.
    """

    def __init__(self, root: str | Path, cache_size: int = 256):
        self.root = Path(root)
        self.images_dir = _resolve_dtd_images_dir(root)
        self.files: list[Path] = sorted(
            p for p in self.images_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )
        if not self.files:
            raise TextureSourceError(
                f"no .jpg/.jpeg/.png texture images found under {self.images_dir} ({_DTD_HINT})",
                self.images_dir,
            )
        self._cache = _LRU(cache_size)

    def __len__(self) -> int:
        return len(self.files)

    def __getstate__(self):  # DataLoader workers start with an empty cache, not a pickled copy
        state = self.__dict__.copy()
        state["_cache"] = _LRU(self._cache.capacity)
        return state

    @property
    def cache_info(self) -> dict[str, int]:
        return {"hits": self._cache.hits, "misses": self._cache.misses, "size": len(self._cache)}

    def load(self, index: int, size: tuple[int, int]) -> np.ndarray:
        """The resized texture ``files[index]`` (read-only, cached)."""
        h, w = _check_size(size)
        key = (int(index), h, w)
        texture = self._cache.get(key)
        if texture is None:
            texture = _read_rgb(self.files[int(index)], (h, w))
            texture.flags.writeable = False
            self._cache.put(key, texture)
        return texture

    def sample(self, rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
        index = int(rng.integers(len(self.files)))
        return self.load(index, size).copy()

    def describe(self) -> str:
        return f"dtd ({len(self.files)} images under {self.images_dir})"


# --------------------------------------------------------------------------------------------
# Self textures: augmented crops of the training images
# --------------------------------------------------------------------------------------------


def _color_jitter(
    image: np.ndarray,
    rng: np.random.Generator,
    brightness: float,
    contrast: float,
    saturation: float,
    channel_shuffle_p: float,
) -> np.ndarray:
    """Brightness, contrast and saturation factors ~ U(1 - j, 1 + j), then a random channel
    permutation with probability ``channel_shuffle_p``. uint8 in and out."""
    b = rng.uniform(1.0 - brightness, 1.0 + brightness)
    c = rng.uniform(1.0 - contrast, 1.0 + contrast)
    s = rng.uniform(1.0 - saturation, 1.0 + saturation)
    shuffle = rng.random() < channel_shuffle_p
    perm = rng.permutation(3)
    x = image.astype(np.float32) * np.float32(b)
    gray = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # H, W
    x = gray[..., None] + np.float32(s) * (x - gray[..., None])
    mean = np.float32(gray.mean())
    x = mean + np.float32(c) * (x - mean)
    out = np.clip(x + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(out[..., perm]) if shuffle else out


class SelfTextureSource(TextureSource):
    """Textures cut from the training images themselves (fallback that needs no download).

    ``images``: uint8 (H, W, 3) arrays or image paths (decoded lazily, LRU-cached). A sample is a
    random crop (each side ``U(crop_range)`` of the image side), randomly flipped (horizontal,
    vertical) and rotated by a multiple of 90 degrees, rescaled to the requested size (bilinear) and
    colour-jittered (brightness / contrast / saturation, random channel permutation) so that the
    patch does not simply continue the image it is pasted into.
    """

    def __init__(
        self,
        images: Sequence[np.ndarray | str | Path],
        crop_range: tuple[float, float] = (0.15, 0.6),
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.6,
        channel_shuffle_p: float = 0.5,
        cache_size: int = 64,
    ):
        images = list(images)
        if not images:
            raise ValueError("SelfTextureSource needs at least one training image")
        for i, item in enumerate(images):
            if not isinstance(item, (str, Path)):
                images[i] = _check_rgb(item, f"images[{i}]")
        if not 0.0 < crop_range[0] <= crop_range[1] <= 1.0:
            raise ValueError(f"crop_range must satisfy 0 < lo <= hi <= 1, got {crop_range}")
        self.images = images
        self.crop_range = (float(crop_range[0]), float(crop_range[1]))
        self.brightness, self.contrast, self.saturation = brightness, contrast, saturation
        self.channel_shuffle_p = channel_shuffle_p
        self._cache = _LRU(cache_size)

    def __len__(self) -> int:
        return len(self.images)

    def _get(self, index: int) -> np.ndarray:
        item = self.images[index]
        if not isinstance(item, (str, Path)):
            return item
        image = self._cache.get(index)
        if image is None:
            path = Path(item)
            try:
                with Image.open(path) as im:
                    image = np.asarray(im.convert("RGB"), dtype=np.uint8)
            except (OSError, SyntaxError, ValueError, UnidentifiedImageError) as exc:
                raise TextureSourceError(f"cannot read training image {path}: {exc}", path) from exc
            self._cache.put(index, image)
        return image

    def sample(self, rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
        h, w = _check_size(size)
        image = self._get(int(rng.integers(len(self.images))))
        ih, iw = image.shape[:2]
        fh, fw = rng.uniform(*self.crop_range, size=2)
        ch, cw = max(2, min(ih, round(fh * ih))), max(2, min(iw, round(fw * iw)))
        y0 = int(rng.integers(0, ih - ch + 1))
        x0 = int(rng.integers(0, iw - cw + 1))
        crop = image[y0 : y0 + ch, x0 : x0 + cw]
        flip_h, flip_v, k = rng.random() < 0.5, rng.random() < 0.5, int(rng.integers(4))
        if flip_h:
            crop = crop[:, ::-1]
        if flip_v:
            crop = crop[::-1]
        crop = np.rot90(crop, k)
        im = Image.fromarray(np.ascontiguousarray(crop)).resize((w, h), Image.BILINEAR)
        return _color_jitter(
            np.asarray(im, dtype=np.uint8), rng, self.brightness, self.contrast,
            self.saturation, self.channel_shuffle_p,
        )

    def describe(self) -> str:
        return f"self ({len(self.images)} training images)"


# --------------------------------------------------------------------------------------------
# Procedural textures
# --------------------------------------------------------------------------------------------


def _palette_map(t: np.ndarray, colors: np.ndarray) -> np.ndarray:
    """Map ``t`` in [0, 1] (H, W) piecewise-linearly through ``colors`` (K, 3) -> float32 (H, W, 3).

    ``t`` is quantised to 256 levels and looked up in a 256-entry palette (a gather, not per-pixel
    arithmetic)."""
    k = colors.shape[0]
    pos = np.linspace(0.0, k - 1.0, 256)
    lo = np.minimum(pos.astype(np.intp), k - 2)
    frac = (pos - lo)[:, None]
    colors = colors.astype(np.float64)
    lut = (colors[lo] * (1.0 - frac) + colors[lo + 1] * frac).astype(np.float32)  # 256, 3
    idx = (np.clip(t, 0.0, 1.0) * np.float32(255.0) + np.float32(0.5)).astype(np.uint8)
    return lut[idx]


def _normalise(field: np.ndarray) -> np.ndarray:
    lo, hi = float(field.min()), float(field.max())
    return (field - lo) / np.float32(max(hi - lo, 1e-6))


class ProceduralTextureSource(TextureSource):
    """Procedural textures in random colours (fallback that needs no download).

    Kinds, picked uniformly (or by ``weights``): ``noise`` (3-5 octave fractal Perlin noise through
    a random 2-3 colour palette), ``stripes`` (sinusoidal or hard-edged, random frequency / angle),
    ``checker`` (rotated checkerboard), ``cells`` (Voronoi cells of random colours), ``gradient``
    (linear or radial). Film-grain Gaussian noise of random strength is added to all of them.
    """

    KINDS = ("noise", "stripes", "checker", "cells", "gradient")

    def __init__(self, kinds: Sequence[str] = KINDS, weights: Sequence[float] | None = None):
        kinds = tuple(kinds)
        unknown = sorted(set(kinds) - set(self.KINDS))
        if not kinds or unknown:
            raise ValueError(f"kinds must be a non-empty subset of {self.KINDS}, got {kinds}")
        self.kinds = kinds
        self.weights = _normalise_weights(weights, len(kinds))

    def sample(self, rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
        h, w = _check_size(size)
        kind = self.kinds[int(rng.choice(len(self.kinds), p=self.weights))]
        colors = rng.integers(0, 256, size=(int(rng.integers(2, 4)), 3)).astype(np.float32)
        rgb = getattr(self, f"_{kind}")(rng, h, w, colors)  # H, W, 3 float32
        sigma = rng.uniform(0.0, 12.0)
        grain = rng.standard_normal((h, w, 1), dtype=np.float32) * np.float32(sigma)
        return np.clip(rgb + grain + 0.5, 0, 255).astype(np.uint8)

    @staticmethod
    def _coords(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
        """Pixel coordinates projected on a random direction: (H, W) float32."""
        theta = rng.uniform(0.0, math.pi)
        ys = np.arange(h, dtype=np.float32)[:, None]
        xs = np.arange(w, dtype=np.float32)[None, :]
        return xs * np.float32(math.cos(theta)) + ys * np.float32(math.sin(theta))

    def _noise(self, rng, h, w, colors):
        # generated at half resolution then upsampled: the octaves are smooth at that scale
        hh, hw = max(1, (h + 1) // 2), max(1, (w + 1) // 2)
        base = 2 ** int(rng.integers(0, 4))
        octaves = int(rng.integers(3, 6))
        field = np.zeros((hh, hw), dtype=np.float32)
        for o in range(octaves):  # a handful of octaves, each a vectorised field
            r = base * 2**o
            field += np.float32(0.5**o) * perlin_noise((hh, hw), (r, r), rng)
        t = Image.fromarray(_normalise(field)).resize((w, h), Image.BILINEAR)
        return _palette_map(np.asarray(t, dtype=np.float32), colors)

    def _stripes(self, rng, h, w, colors):
        period = rng.uniform(4.0, max(6.0, min(h, w) / 2.0))
        phase = rng.uniform(0.0, 2.0 * math.pi)
        s = np.sin(self._coords(rng, h, w) * np.float32(2.0 * math.pi / period) + np.float32(phase))
        if rng.random() < 0.5:
            t = (s > np.float32(rng.uniform(-0.6, 0.6))).astype(np.float32)
        else:
            t = (s + 1.0) * 0.5
        return _palette_map(t, colors)

    def _checker(self, rng, h, w, colors):
        cell = rng.uniform(4.0, max(6.0, min(h, w) / 4.0))
        theta = rng.uniform(0.0, math.pi / 2)
        ys = np.arange(h, dtype=np.float32)[:, None]
        xs = np.arange(w, dtype=np.float32)[None, :]
        u = xs * np.float32(math.cos(theta)) + ys * np.float32(math.sin(theta))
        v = ys * np.float32(math.cos(theta)) - xs * np.float32(math.sin(theta))
        t = (np.floor(u / cell) + np.floor(v / cell)) % 2
        return _palette_map(t.astype(np.float32), colors[:2])

    def _cells(self, rng, h, w, colors):
        k = int(rng.integers(6, 49))
        lh, lw = max(1, h // 4), max(1, w // 4)  # Voronoi at quarter resolution, upsampled
        seeds = rng.uniform(0.0, 1.0, size=(k, 2)).astype(np.float32) * np.array([lh, lw], np.float32)
        cell_colors = rng.integers(0, 256, size=(k, 3)).astype(np.uint8)
        ys = np.arange(lh, dtype=np.float32)[:, None, None]
        xs = np.arange(lw, dtype=np.float32)[None, :, None]
        d = (ys - seeds[:, 0]) ** 2 + (xs - seeds[:, 1]) ** 2  # lh, lw, k
        small = cell_colors[np.argmin(d, axis=2)]  # lh, lw, 3
        return np.asarray(Image.fromarray(small).resize((w, h), Image.NEAREST), dtype=np.float32)

    def _gradient(self, rng, h, w, colors):
        if rng.random() < 0.5:
            t = _normalise(self._coords(rng, h, w))
        else:
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            ys = np.arange(h, dtype=np.float32)[:, None] - np.float32(cy)
            xs = np.arange(w, dtype=np.float32)[None, :] - np.float32(cx)
            t = _normalise(np.sqrt(ys * ys + xs * xs))
        return _palette_map(t, colors)

    def describe(self) -> str:
        return "procedural (" + "/".join(self.kinds) + ")"


# --------------------------------------------------------------------------------------------
# Mixture and factory
# --------------------------------------------------------------------------------------------


def _normalise_weights(weights: Sequence[float] | None, n: int) -> np.ndarray:
    if weights is None:
        return np.full(n, 1.0 / n)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n,) or np.any(w < 0) or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"weights must be {n} non-negative numbers with a positive sum, got {weights}")
    return w / w.sum()


class MixedTextureSource(TextureSource):
    """Picks one of ``sources`` per sample with probabilities proportional to ``weights``."""

    def __init__(self, sources: Sequence[TextureSource], weights: Sequence[float] | None = None):
        self.sources = list(sources)
        if not self.sources:
            raise ValueError("MixedTextureSource needs at least one source")
        self.weights = _normalise_weights(weights, len(self.sources))

    def sample(self, rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
        k = int(rng.choice(len(self.sources), p=self.weights))
        return self.sources[k].sample(rng, size)

    def describe(self) -> str:
        parts = [f"{s.describe()} p={w:.2f}" for s, w in zip(self.sources, self.weights)]
        return "mixed [" + "; ".join(parts) + "]"


def make_texture_source(
    kind: str,
    dtd_root: str | Path | None = None,
    images: Sequence[np.ndarray | str | Path] | None = None,
    cache_size: int = 256,
) -> tuple[TextureSource, str]:
    """Build the texture source named ``kind`` and a description to record as a run tag.

    * ``"dtd"``: :class:`DTDTextureSource` at ``dtd_root`` (the papers' choice). A missing
      ``dtd_root`` or a bad folder raises :class:`TextureSourceError`: never a silent fallback.
    * ``"self"``: :class:`SelfTextureSource` over ``images`` (training images or their paths).
    * ``"procedural"``: :class:`ProceduralTextureSource`.
    * ``"fallback"``: 50/50 mix of self + procedural (procedural only when ``images`` is empty;
      the description says so).

    The description starts with the kind, e.g. ``"dtd (5640 images under /data/dtd/images)"``.
    """
    if kind == "dtd":
        if dtd_root is None or str(dtd_root) == "":
            raise TextureSourceError(
                "texture source 'dtd' needs dtd_root (the DTD folder); set it, or choose "
                "'self', 'procedural' or 'fallback' explicitly"
            )
        source: TextureSource = DTDTextureSource(dtd_root, cache_size=cache_size)
        return source, source.describe()
    if kind == "self":
        if not images:
            raise ValueError("texture source 'self' needs training images")
        source = SelfTextureSource(images)
        return source, source.describe()
    if kind == "procedural":
        source = ProceduralTextureSource()
        return source, source.describe()
    if kind == "fallback":
        procedural = ProceduralTextureSource()
        if not images:
            return procedural, "fallback (procedural only: no training images given)"
        own = SelfTextureSource(images)
        source = MixedTextureSource([own, procedural], [0.5, 0.5])
        return source, f"fallback ({own.describe()} p=0.50 + {procedural.describe()} p=0.50)"
    raise ValueError(f"unknown texture source kind {kind!r}; expected one of {TEXTURE_KINDS}")
