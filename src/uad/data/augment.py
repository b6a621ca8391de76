"""Training-set augmentation for few-shot settings (k normal images per class, replicated).

AGPNet (Sec. 4.1) trains its few-shot models with "32-fold data augmentation": each of the k
images is used 32 times. :class:`FoldAugment` is that, in the dataset's ``augment(image, index)``
hook contract (see :mod:`uad.data.torch_data`): the training index is repeated ``folds`` times,
copy 0 of each image stays as it is, every other copy is transformed by ``fn(image, rng)`` with
``rng = default_rng([seed, epoch, index])`` (reproducible for any worker count and order).
:class:`FlipRotateColor` is the transform: the paper names none, so the usual industrial set
(flips, a small rotation with reflected borders, brightness / contrast / saturation jitter).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from PIL import Image, ImageEnhance

__all__ = ["ChainAugment", "EpochForwarding", "FlipRotateColor", "FoldAugment"]


class FlipRotateColor:
    """``fn(image_uint8 (H, W, 3), rng) -> image_uint8``: each op of ``ops`` in order,
    ``hflip`` / ``vflip`` with probability 1/2, ``rotate`` by U(-max_rotation, max_rotation) degrees
    (bilinear; the image is reflect-padded first so no black corners appear), ``color``:
    brightness, contrast and saturation factors each U(1 - color, 1 + color)."""

    def __init__(self, ops: Sequence[str] = ("hflip", "vflip", "rotate", "color"), max_rotation: float = 15.0,
                 color: float = 0.1):
        unknown = sorted(set(ops) - {"hflip", "vflip", "rotate", "color"})
        if unknown:
            raise ValueError(f"unknown augmentation op(s) {unknown}")
        self.ops, self.max_rotation, self.color = tuple(ops), float(max_rotation), float(color)

    def _rotate(self, img: np.ndarray, degrees: float) -> np.ndarray:
        h, w = img.shape[:2]
        rad = math.radians(abs(degrees))
        pad = int(math.ceil(max(h, w) * (math.sin(rad) + math.cos(rad) - 1) / 2)) + 2
        padded = np.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
        rot = np.asarray(Image.fromarray(padded).rotate(degrees, resample=Image.BILINEAR))
        return np.ascontiguousarray(rot[pad:pad + h, pad:pad + w])

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        img = image
        for op in self.ops:
            if op == "hflip" and rng.random() < 0.5:
                img = img[:, ::-1]
            elif op == "vflip" and rng.random() < 0.5:
                img = img[::-1]
            elif op == "rotate" and self.max_rotation > 0:
                img = self._rotate(np.ascontiguousarray(img), float(rng.uniform(-self.max_rotation, self.max_rotation)))
            elif op == "color" and self.color > 0:
                pil = Image.fromarray(np.ascontiguousarray(img))
                for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
                    pil = enhance(pil).enhance(float(rng.uniform(1 - self.color, 1 + self.color)))
                img = np.asarray(pil)
        return np.ascontiguousarray(img, dtype=np.uint8)


class FoldAugment:
    """Dataset hook over an index repeated ``folds`` times: rows ``0 .. n_images - 1`` (copy 0)
    are returned unchanged, row ``i >= n_images`` is ``fn(image, default_rng([seed, epoch, i]))``."""

    def __init__(self, fn: Callable[[np.ndarray, np.random.Generator], np.ndarray], n_images: int, seed: int = 0):
        if n_images < 1:
            raise ValueError("FoldAugment needs at least one image")
        self.fn, self.n_images, self.seed = fn, int(n_images), int(seed)
        self.epoch = 0

    def __call__(self, image: np.ndarray, index: int):
        if int(index) < self.n_images:
            return image, None, 0
        rng = np.random.default_rng([self.seed, int(self.epoch), int(index)])
        return self.fn(image, rng), None, 0


class EpochForwarding:
    """A hook made of other hooks: setting its ``epoch`` (the dataset does, before each call)
    sets it on every inner hook that has one (:meth:`inner_hooks`)."""

    _epoch = 0

    def inner_hooks(self) -> Iterable[Any]:  # pragma: no cover - overridden
        return ()

    @property
    def epoch(self) -> int:
        return self._epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch = int(value)
        for h in self.inner_hooks():
            if hasattr(h, "epoch"):
                h.epoch = self._epoch

    def set_epoch(self, value: int) -> None:
        self.epoch = value


class ChainAugment(EpochForwarding):
    """Hooks applied in order; a mask and label returned by a later hook win."""

    def __init__(self, *hooks: Any):
        self.hooks = [h for h in hooks if h is not None]

    def inner_hooks(self) -> Iterable[Any]:
        return self.hooks

    def __call__(self, image: np.ndarray, index: int):
        mask, label = None, 0
        for h in self.hooks:
            image, m, lab = h(image, index)
            if m is not None:
                mask, label = m, lab
        return image, mask, label
