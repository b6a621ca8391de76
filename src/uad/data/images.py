"""Reading images and ground-truth masks, the same way everywhere.

Every image in every dataset goes through :func:`load_image`, so that a grayscale MPDD part, a
16-bit TIFF and an RGBA PNG all arrive as ``uint8 (H, W, 3)`` RGB with one documented rule per
PIL mode:

========================  =========================================================================
PIL mode                  conversion to ``uint8`` RGB
========================  =========================================================================
``RGB``                   unchanged
``L``, ``1``              gray value copied to the three channels (``1``: 0 / 255)
``I;16*``, ``I``          16-bit range: ``round(v / 257)`` (65535 -> 255, 257 -> 1), values
                          clipped to [0, 65535] first (``I`` is PIL's 32-bit container that older
                          Pillow versions use for 16-bit PNGs, so it is read as 16-bit), then
                          copied to the three channels
``F``                     clipped to [0, 255] and rounded (like PIL's own ``convert("L")``)
``RGBA``, ``LA``, ``PA``  **alpha composited over black**: ``round(c * a / 255)``. Transparent
                          pixels become black, opaque pixels keep their colour. Black matches the
                          zero padding a network sees outside the image, and is one fixed rule
``P`` (palette)           expanded through the palette as ``RGBA`` (so palette transparency is
                          honoured), then composited over black as above
``CMYK``, ``YCbCr``,      PIL's ``convert("RGB")``
``LAB``, ``HSV``, other
========================  =========================================================================

Masks (:func:`load_mask`) are decoded to one channel (the per-pixel maximum over the channels,
after palette expansion), and ``nonzero`` means anomalous. :func:`read_mask_values` returns the
raw integer values so that :func:`uad.data.index.validate_index` can insist on binary masks.

Every failure (missing file, not an image, truncated or corrupt data, unsupported mode) raises
:class:`ImageReadError`, a :class:`ValueError` whose message names the file and the problem.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from uad.errors import UadError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageReadError",
    "image_size",
    "load_image",
    "load_mask",
    "read_mask_values",
    "to_rgb_uint8",
]

#: File extensions treated as images by the layout scanners (lower case, with the dot).
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class ImageReadError(UadError, ValueError):
    """An image or mask file could not be read. ``path`` and ``reason`` are kept as attributes."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = str(reason)
        super().__init__(f"cannot read image {self.path}: {self.reason}")

    def __reduce__(self):  # keep it picklable across DataLoader workers / process pools
        return (type(self), (self.path, self.reason))


def _open_decoded(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode ``path`` (truncated files fail here, not later)."""
    p = Path(path)
    if not p.is_file():
        raise ImageReadError(p, "file does not exist" if not p.exists() else "not a regular file")
    try:
        with Image.open(p) as im:
            im.load()
            # ``load`` decoded the pixels; ``copy`` detaches them from the closed file handle.
            return im.copy()
    except ImageReadError:
        raise
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise ImageReadError(p, f"{type(exc).__name__}: {exc}") from exc


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` from the file header only (no pixel decoding). Raises ImageReadError."""
    p = Path(path)
    if not p.is_file():
        raise ImageReadError(p, "file does not exist" if not p.exists() else "not a regular file")
    try:
        with Image.open(p) as im:
            return int(im.size[0]), int(im.size[1])
    except Exception as exc:
        raise ImageReadError(p, f"{type(exc).__name__}: {exc}") from exc


def _composite_over_black(rgba: np.ndarray) -> np.ndarray:
    """(H, W, 4) uint8 -> (H, W, 3) uint8, ``round(c * a / 255)``."""
    rgb = rgba[..., :3].astype(np.uint32)
    a = rgba[..., 3:4].astype(np.uint32)
    return ((rgb * a + 127) // 255).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=2)


def to_rgb_uint8(im: Image.Image, path: str | os.PathLike = "<memory>") -> np.ndarray:
    """Convert a decoded PIL image to ``uint8 (H, W, 3)`` following the module's table."""
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im, dtype=np.uint8).copy()
    if mode in ("L", "1"):
        return _gray_to_rgb(np.asarray(im.convert("L"), dtype=np.uint8))
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(im).astype(np.int64)
        a = np.clip(a, 0, 65535)
        return _gray_to_rgb(((a + 128) // 257).astype(np.uint8))
    if mode == "F":
        a = np.asarray(im, dtype=np.float64)
        a = np.nan_to_num(a, nan=0.0, posinf=255.0, neginf=0.0)
        return _gray_to_rgb(np.clip(np.rint(a), 0, 255).astype(np.uint8))
    if mode in ("RGBA", "LA", "PA", "P", "RGBa", "La"):
        return _composite_over_black(np.asarray(im.convert("RGBA"), dtype=np.uint8))
    try:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except Exception as exc:
        raise ImageReadError(path, f"unsupported image mode {mode!r}: {exc}") from exc


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read ``path`` as ``uint8 (H, W, 3)`` RGB (see the module docstring for each PIL mode).

    Raises :class:`ImageReadError` naming the file when it is missing, truncated or corrupt.
    """
    im = _open_decoded(path)
    arr = to_rgb_uint8(im, path)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageReadError(path, f"unexpected decoded shape {arr.shape}")
    return arr


def read_mask_values(path: str | os.PathLike) -> np.ndarray:
    """Raw mask values as a 2-D non-negative integer array (H, W).

    Multi-channel masks are reduced with the per-pixel maximum over colour channels (alpha is
    ignored); palette masks are expanded through their palette first.
    """
    im = _open_decoded(path)
    mode = im.mode
    if mode == "P" or mode == "PA":
        im = im.convert("RGB")
        mode = "RGB"
    if mode == "1":
        return np.asarray(im.convert("L"), dtype=np.uint8)
    a = np.asarray(im)
    if a.ndim == 3:
        n_color = 1 if mode in ("LA", "La") else min(3, a.shape[2])
        a = a[..., :n_color].max(axis=2)
    if a.ndim != 2:
        raise ImageReadError(path, f"unexpected mask shape {a.shape}")
    if np.issubdtype(a.dtype, np.floating):
        a = np.nan_to_num(a, nan=0.0)
        a = np.clip(np.rint(a), 0, None).astype(np.int64)
    elif a.dtype.kind == "i":
        a = np.clip(a, 0, None)
    return a


def load_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a ground-truth mask as ``np.bool_ (H, W)``: any nonzero value is anomalous.

    Whether the mask is properly binary (0 and one positive value) is checked by
    :func:`uad.data.index.validate_index`, not here.
    """
    return read_mask_values(path) > 0
