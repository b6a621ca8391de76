"""Torch dataset and loaders over a sample index (see :mod:`uad.data.index`).

Preprocessing follows Dinomaly / INP-Former (torchvision ``Resize((r, r))`` then
``CenterCrop(c)``): the image is resized to a square ``resize x resize`` with PIL bilinear
(which antialiases when shrinking), then centre-cropped to ``crop x crop`` using torchvision's
offsets (``int(round((resize - crop) / 2))``). The ground-truth mask goes through the same resize
(nearest neighbour) and the same crop, so mask and image stay aligned pixel for pixel.

A sample is a dict::

    image     float32 (3, crop, crop)   (x / 255 - mean) / std
    mask      float32 (1, crop, crop)   values in {0, 1}; zeros when the row has no mask
    label     int64 ()                  0 normal, 1 anomalous
    class_id  int64 ()                  position of the row's class in sorted(class_names)
    index     int64 ()                  row position in the index DataFrame

Augmentation hook (pseudo-anomaly synthesis plugs in here)::

    augment(image_uint8 (crop, crop, 3), index: int) -> (image_uint8, mask_bool_or_None, label)

It runs after resize / crop and before normalisation. When it returns a mask, that mask and the
returned label replace the sample's; when it returns ``None`` only the image is replaced.
Augmentations that need fresh randomness per epoch read the dataset's epoch: before each call,
when the augment object has an ``epoch`` attribute, the dataset sets it to its own
:attr:`AnomalyImageDataset.epoch`. :class:`SeededAugment` wraps an ``fn(image, rng)`` callable
(such as ``uad.synthesis.PseudoAnomalySynthesizer``) into that contract with an
``numpy.random.default_rng([seed, epoch, index])``, so every (epoch, sample) pair is reproducible
regardless of worker count or order.

The epoch is a plain, process-local attribute. A DataLoader worker holds its own copy of the
dataset, so calling :meth:`AnomalyImageDataset.set_epoch` in the main process does not reach
workers that already exist (persistent ones). :func:`make_loader` with ``infinite=True`` solves
this the race-free way: its sampler (which runs in the main process) emits virtual indices
``epoch * n + i`` and a thin wrapper sets the epoch inside whichever process decodes the sample
(the training engine's ``EpochAwareDataset`` does the same). A plain ``make_loader`` with
``num_workers > 0`` therefore keeps the epoch the workers started with.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler


from .images import load_image, load_mask

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "AnomalyImageDataset",
    "EpochAwareDataset",
    "InfiniteLoader",
    "SeededAugment",
    "SkipUnreadable",
    "center_crop_offsets",
    "denormalize",
    "finish_batch",
    "uint8_twin",
    "make_loader",
    "resize_and_crop",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

AugmentFn = Callable[[np.ndarray, int], "tuple[np.ndarray, np.ndarray | None, int]"]


class EpochAwareDataset(Dataset):
    """The one epoch-indexing wrapper of the training engine and :func:`make_loader`: maps a
    virtual index ``e * n + i`` to sample ``i`` of epoch ``e`` (sets ``base.epoch``)."""

    def __init__(self, base: Dataset):
        self.base = base
        self.n = len(base)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, v: int):
        epoch, i = divmod(int(v), self.n)
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)
        elif hasattr(self.base, "epoch"):
            self.base.epoch = epoch
        return self.base[i]


def center_crop_offsets(size: int, crop: int) -> int:
    """Top/left offset of a centre crop, exactly as torchvision's ``CenterCrop`` computes it."""
    return int(round((size - crop) / 2.0))


def resize_and_crop(arr: np.ndarray, resize: int, crop: int, is_mask: bool = False) -> np.ndarray:
    """Resize an ``(H, W, 3) uint8`` image (bilinear) or ``(H, W) bool`` mask (nearest) to a square
    ``resize x resize``, then centre-crop ``crop x crop``."""
    if is_mask:
        im = Image.fromarray(arr.astype(np.uint8) * 255)
        im = im.resize((resize, resize), Image.NEAREST)
    else:
        im = Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8))
        if im.size != (resize, resize):
            im = im.resize((resize, resize), Image.BILINEAR)
    out = np.asarray(im)
    o = center_crop_offsets(resize, crop)
    out = out[o : o + crop, o : o + crop]
    return out > 127 if is_mask else np.ascontiguousarray(out)


class SeededAugment:
    """Adapter from ``fn(image_uint8, rng) -> (image, mask | None, label)`` to the dataset's
    ``augment(image, index)`` hook, drawing ``rng = default_rng([seed, epoch, index])``."""

    def __init__(self, fn: Callable[[np.ndarray, np.random.Generator], Any], seed: int = 0):
        self.fn = fn
        self.seed = int(seed)
        self.epoch = 0

    def __call__(self, image: np.ndarray, index: int):
        rng = np.random.default_rng([self.seed, int(self.epoch), int(index)])
        return self.fn(image, rng)


class AnomalyImageDataset(Dataset):
    """Images (and masks) of a sample index, resized + centre-cropped + normalised.

    Args:
        index_df: sample index (columns of :data:`uad.data.index.INDEX_COLUMNS`; at least
            ``class_name, label, image_path, mask_path``). Row ``i`` is sample ``i``.
        resize, crop: square resize then centre crop (``crop <= resize``).
        mean, std: per-channel normalisation on [0, 1] images.
        augment: optional hook, see the module docstring.
        class_names: the class vocabulary for ``class_id`` (sorted here); defaults to the
            classes of ``index_df``. Every row's class must be in it.
        cache_decoded: keep the resized + cropped ``uint8`` image and mask in memory (LRU,
            bounded by ``cache_max_bytes``) so small datasets are decoded once, not every epoch.
            Each DataLoader worker holds its own cache; persistent workers keep it across epochs.
        shared_cache: a folder for a :class:`~uad.data.cache.SharedDecodedCache`: one
            memory-mapped file of prepared rows that every worker reads and fills (MVTec-size
            training sets are decoded once per run instead of once per epoch per worker). Replaces
            the per-worker LRU when given.
    """

    def __init__(
        self,
        index_df: pd.DataFrame,
        resize: int,
        crop: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        augment: AugmentFn | None = None,
        class_names: Sequence[str] | None = None,
        cache_decoded: bool = True,
        cache_max_bytes: int = 512 * 2**20,
        shared_cache: str | None = None,
    ):
        resize, crop = int(resize), int(crop)
        if crop <= 0 or resize <= 0 or crop > resize:
            raise ValueError(f"need 0 < crop <= resize, got resize={resize}, crop={crop}")
        for col in ("class_name", "label", "image_path"):
            if col not in index_df.columns:
                raise ValueError(f"index_df is missing column {col!r} (has {list(index_df.columns)})")
        self.resize, self.crop = resize, crop
        self.image_paths = [str(p) for p in index_df["image_path"].tolist()]
        if "mask_path" in index_df.columns:
            self.mask_paths = ["" if (m is None or (isinstance(m, float) and np.isnan(m))) else str(m)
                               for m in index_df["mask_path"].tolist()]
        else:
            self.mask_paths = [""] * len(self.image_paths)
        self.labels = [int(x) for x in index_df["label"].tolist()]
        row_classes = [str(c) for c in index_df["class_name"].tolist()]
        self.class_names = sorted(set(row_classes) if class_names is None else {str(c) for c in class_names})
        pos = {c: i for i, c in enumerate(self.class_names)}
        missing = sorted(set(row_classes) - set(pos))
        if missing:
            raise ValueError(f"classes {missing} of index_df are not in class_names {self.class_names}")
        self.class_ids = [pos[c] for c in row_classes]
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
        self.augment = augment
        self.cache_decoded = bool(cache_decoded)
        self.cache_max_bytes = int(cache_max_bytes)
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray | None]] = OrderedDict()
        self._cache_bytes = 0
        self._epoch = 0
        #: samples carry ``image`` / ``mask`` as uint8 (4x fewer bytes through the loader, pinned
        #: memory and the host-to-device copy); :meth:`normalise` finishes them on the device.
        #: Set on a copy by :func:`uint8_twin`, never on a dataset others read.
        self.uint8_output = False
        self._norm: dict = {}
        self.shared = None
        if shared_cache:
            from .cache import SharedDecodedCache, cache_key

            key = cache_key(self.image_paths, self.mask_paths, resize, crop)
            self.shared = SharedDecodedCache(shared_cache, key, len(self.image_paths), crop)

    # --- epoch ---------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """The epoch handed to ``augment`` (process-local, see the module docstring)."""
        return self._epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch = int(value)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch seen by ``augment`` in this process."""
        self._epoch = int(epoch)

    # --- decoding ------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.image_paths)

    def load_prepared(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Resized + cropped ``uint8 (crop, crop, 3)`` image and ``bool (crop, crop)`` mask (or
        ``None`` when the row has no mask) for row ``i``, through the cache."""
        if self.shared is not None:
            row = self.shared.get(i)
            if row is not None:
                return row
        hit = self._cache.get(i)
        if hit is not None:
            self._cache.move_to_end(i)
            return hit
        img = resize_and_crop(load_image(self.image_paths[i]), self.resize, self.crop)
        mask = None
        if self.mask_paths[i]:
            mask = resize_and_crop(load_mask(self.mask_paths[i]), self.resize, self.crop, is_mask=True)
        if self.shared is not None:
            self.shared.put(i, img, mask)
        elif self.cache_decoded:
            nbytes = img.nbytes + (mask.nbytes if mask is not None else 0)
            if nbytes <= self.cache_max_bytes:
                img.setflags(write=False)
                if mask is not None:
                    mask.setflags(write=False)
                self._cache[i] = (img, mask)
                self._cache_bytes += nbytes
                while self._cache_bytes > self.cache_max_bytes:
                    _, (oi, om) = self._cache.popitem(last=False)
                    self._cache_bytes -= oi.nbytes + (om.nbytes if om is not None else 0)
        return img, mask

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        i = int(i)
        if i < 0:
            i += len(self)
        img, mask = self.load_prepared(i)
        label = self.labels[i]
        if self.augment is not None:
            if hasattr(self.augment, "epoch"):
                self.augment.epoch = self.epoch
            out_img, out_mask, out_label = self.augment(img.copy(), i)
            out_img = np.asarray(out_img)
            if out_img.shape != (self.crop, self.crop, 3):
                raise ValueError(f"augment returned image of shape {out_img.shape}, expected {(self.crop, self.crop, 3)}")
            img = out_img.astype(np.uint8, copy=False)
            if out_mask is not None:
                mask = np.asarray(out_mask).astype(bool).reshape(self.crop, self.crop)
                label = int(out_label)
        if self.uint8_output:
            image = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))  # H, W, 3 -> 3, H, W uint8
            m = np.zeros((1, self.crop, self.crop), np.uint8) if mask is None else mask[None].astype(np.uint8)
        else:
            x = img.astype(np.float32).transpose(2, 0, 1) / 255.0  # H, W, 3 -> 3, H, W
            x = (x - self.mean) / self.std
            image = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
            m = np.zeros((1, self.crop, self.crop), np.float32) if mask is None else mask[None].astype(np.float32)
        return {
            "image": image,
            "mask": torch.from_numpy(m),
            "label": torch.tensor(label, dtype=torch.int64),
            "class_id": torch.tensor(self.class_ids[i], dtype=torch.int64),
            "index": torch.tensor(i, dtype=torch.int64),
        }


    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (B, 3, H, W) from :attr:`uint8_output` samples -> the float32 normalised
        images ``__getitem__`` gives otherwise, on the images' device: ``(x / 255 - mean) / std``
        in float32, the same IEEE operations in the same order, so the values are identical."""
        key = images.device
        if key not in self._norm:
            self._norm[key] = (torch.from_numpy(self.mean).to(key), torch.from_numpy(self.std).to(key))
        mean, std = self._norm[key]
        return (images.float() / 255.0 - mean) / std

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_norm"] = {}  # device tensors stay in their process
        return state


def uint8_twin(ds: Dataset) -> tuple[Dataset, AnomalyImageDataset] | None:
    """A copy of ``ds`` (an :class:`AnomalyImageDataset`, possibly inside :class:`SkipUnreadable`
    or ``torch.utils.data.Subset``) whose samples carry uint8 images and masks, and the inner
    dataset whose :meth:`~AnomalyImageDataset.normalise` finishes them; None for any other
    dataset (its samples stay as they are). ``ds`` itself is not changed."""
    import copy

    from torch.utils.data import Subset

    if isinstance(ds, AnomalyImageDataset):
        twin = copy.copy(ds)
        twin.uint8_output = True
        twin._norm = {}
        return twin, twin
    if isinstance(ds, SkipUnreadable):
        inner = uint8_twin(ds.base)
        return None if inner is None else (SkipUnreadable(inner[0]), inner[1])
    if isinstance(ds, Subset):
        inner = uint8_twin(ds.dataset)
        return None if inner is None else (Subset(inner[0], ds.indices), inner[1])
    return None


def finish_batch(batch: dict[str, Any], normalise: Callable[[torch.Tensor], torch.Tensor] | None) -> dict[str, Any]:
    """A batch of :attr:`~AnomalyImageDataset.uint8_output` samples, already on its device, as the
    float batch the methods read: images normalised, masks float32. Other batches unchanged."""
    if normalise is None or not isinstance(batch, dict):
        return batch
    out = dict(batch)
    if isinstance(out.get("image"), torch.Tensor) and out["image"].dtype == torch.uint8:
        out["image"] = normalise(out["image"])
    if isinstance(out.get("mask"), torch.Tensor) and out["mask"].dtype == torch.uint8:
        out["mask"] = out["mask"].float()
    return out


class SkipUnreadable(Dataset):
    """Wraps an :class:`AnomalyImageDataset` so an image (or mask) that cannot be decoded does not
    stop the loader: its sample is a zero image with ``error`` set to the reason (``""`` for a
    good sample). Each file is decoded once, by the loader's workers; callers drop the flagged
    samples (inference lists them as unreadable)."""

    def __init__(self, base: AnomalyImageDataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            return {**self.base[i], "error": ""}
        except Exception as e:  # ImageReadError names the file; anything else is reported the same way
            c = self.base.crop
            dtype = torch.uint8 if self.base.uint8_output else torch.float32
            return {"image": torch.zeros(3, c, c, dtype=dtype), "mask": torch.zeros(1, c, c, dtype=dtype), "label": torch.tensor(0),
                    "class_id": torch.tensor(0), "index": torch.tensor(int(i)), "error": str(e) or type(e).__name__}


def _seed_worker(worker_id: int) -> None:
    """Seed numpy and ``random`` in each worker from torch's per-worker seed (itself derived
    from the loader's seeded generator)."""
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


class _EpochIndexSampler(Sampler[int]):
    """Yields virtual indices ``epoch * n + i`` for the epoch set by its owner (main process)."""

    def __init__(self, n: int, num_samples: int, shuffle: bool, generator: torch.Generator):
        self.n, self.num_samples, self.shuffle, self.generator = n, num_samples, shuffle, generator
        self.epoch = 0

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        reps = -(-self.num_samples // self.n)
        if self.shuffle:
            order = torch.cat([torch.randperm(self.n, generator=self.generator) for _ in range(reps)])
        else:
            order = torch.arange(self.n).repeat(reps)
        return iter((order[: self.num_samples] + self.epoch * self.n).tolist())


class InfiniteLoader:
    """Iterator over batches that cycles epochs forever; sample ``i`` of pass ``e`` is decoded
    with the dataset's epoch set to ``e`` (in the worker that decodes it). ``epoch`` is the pass
    in progress, ``batches_per_epoch`` its length, ``dataset`` the wrapped dataset."""

    def __init__(self, loader: DataLoader, sampler: _EpochIndexSampler, dataset: Dataset):
        self.loader = loader
        self.sampler = sampler
        self.dataset = dataset
        self.batch_size = loader.batch_size
        self.batches_per_epoch = len(loader)
        self.epoch = 0
        self._it: Iterator | None = None

    def __iter__(self) -> "InfiniteLoader":
        return self

    def __next__(self):
        for _ in range(2):
            if self._it is None:
                self.sampler.epoch = self.epoch
                if hasattr(self.dataset, "set_epoch"):
                    self.dataset.set_epoch(self.epoch)  # the main-process copy (num_workers=0)
                self._it = iter(self.loader)
            try:
                return next(self._it)
            except StopIteration:
                self._it = None
                self.epoch += 1
        raise RuntimeError(
            f"the loader yields no batch (dataset of {len(self.dataset)} samples, batch_size={self.batch_size})"
        )


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = False,
    num_workers: int = 0,
    seed: int = 0,
    drop_last: bool = False,
    infinite: bool = False,
) -> DataLoader | InfiniteLoader:
    """A seeded DataLoader (persistent workers when ``num_workers > 0``, pinned memory when CUDA
    is available). With ``infinite=True`` an :class:`InfiniteLoader` for iteration-based training.

    With ``infinite`` and ``drop_last``, a dataset smaller than ``batch_size`` is repeated
    (successive permutations when shuffling) to fill one full batch per pass, so a 2-shot
    dataset still trains instead of yielding nothing.
    """
    n = len(dataset)
    if n == 0:
        raise ValueError("cannot build a loader over an empty dataset")
    gen = torch.Generator()
    gen.manual_seed(int(seed))
    kwargs: dict[str, Any] = dict(
        batch_size=int(batch_size),
        num_workers=int(num_workers),
        drop_last=bool(drop_last),
        pin_memory=torch.cuda.is_available(),
        generator=gen,
        worker_init_fn=_seed_worker,
        persistent_workers=int(num_workers) > 0,
    )
    if not infinite:
        return DataLoader(dataset, shuffle=bool(shuffle), **kwargs)
    num_samples = max(n, int(batch_size)) if drop_last else n
    sampler = _EpochIndexSampler(n, num_samples, bool(shuffle), gen)
    loader = DataLoader(EpochAwareDataset(dataset), sampler=sampler, **kwargs)
    return InfiniteLoader(loader, sampler, dataset)


def denormalize(images, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """Undo normalisation: ``(B, 3, H, W)`` or ``(3, H, W)`` tensor/array -> ``uint8 (B, H, W, 3)``."""
    if isinstance(images, torch.Tensor):
        images = images.detach().float().cpu().numpy()
    x = np.asarray(images, dtype=np.float32)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected (B, 3, H, W) or (3, H, W), got {x.shape}")
    m = np.asarray(mean, np.float32).reshape(1, 3, 1, 1)
    s = np.asarray(std, np.float32).reshape(1, 3, 1, 1)
    x = (x * s + m) * 255.0
    return np.clip(np.rint(x), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)  # B, 3, H, W -> B, H, W, 3
