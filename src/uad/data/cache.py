"""A decoded-image cache shared by every DataLoader worker: one memory-mapped file per dataset.

Decoding a 1024 px PNG and resizing it costs 20-40 ms of CPU; a training run reads each image
hundreds of times (Dinomaly: 10,000 iterations x 16 = 44 passes over MVTec's 3,629 images). The
in-process LRU of :class:`~uad.data.torch_data.AnomalyImageDataset` is per worker, and a worker
sees a random sixteenth of every epoch, so its hit rate stays low. This cache is one file that
every worker maps: whoever decodes sample ``i`` first writes the prepared ``uint8`` image (and
mask) to row ``i``, then marks the row filled; from then on any worker reads it as a memory copy
from the OS page cache. The first epoch costs what it always did, every later one almost nothing.

The file name is a hash of the rows' image and mask paths, their sizes and modification times,
and the resize / crop: a changed image, another crop or another dataset never reads stale rows.
Rows are written whole before their state byte (``0`` empty, ``1`` image, ``2`` image and mask),
so a reader never sees a half-written row as filled; two workers decoding the same row write the
same bytes. Nothing in the file is pickled: it is raw ``uint8``. Space: ``crop * crop * 4`` bytes
per row (1.7 GB for MVTec's training set at 392): delete the folder to reclaim it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["SharedDecodedCache", "cache_key"]

_VERSION = 1


def cache_key(image_paths: Sequence[str], mask_paths: Sequence[str], resize: int, crop: int) -> str:
    """Hash of what the prepared rows depend on (paths, sizes, mtimes, resize, crop)."""
    h = hashlib.sha256(json.dumps([_VERSION, int(resize), int(crop)]).encode())
    for img, mask in zip(image_paths, mask_paths):
        for p in (img, mask):
            if not p:
                h.update(b"-\0")
                continue
            try:
                st = os.stat(p)
                h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
            except OSError:
                h.update(f"{p}\0missing\0".encode())
    return h.hexdigest()[:24]


class SharedDecodedCache:
    """Rows of prepared images ``(crop, crop, 3) uint8`` and masks ``(crop, crop) bool`` in one
    memory-mapped file under ``folder`` (see the module docstring). Picklable: a worker re-opens
    the mapping on first use."""

    def __init__(self, folder: str | os.PathLike, key: str, n: int, crop: int):
        self.folder, self.key, self.n, self.crop = Path(folder), str(key), int(n), int(crop)
        self.path = self.folder / f"decoded-{self.key}-{self.n}x{self.crop}.u8"
        self._row = self.crop * self.crop * 4  # image (3 bytes / pixel) + mask (1 byte / pixel)
        size = self.n * (self._row + 1)  # + one state byte per row, at the end
        self.folder.mkdir(parents=True, exist_ok=True)
        if not self.path.is_file() or self.path.stat().st_size != size:
            tmp = self.path.with_suffix(f".tmp{os.getpid()}")
            with open(tmp, "wb") as f:  # sparse: disk is used as rows are written
                f.truncate(size)
            os.replace(tmp, self.path)
        self._mm: np.memmap | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_mm"] = None
        return state

    def _map(self) -> np.memmap:
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r+")
        return self._mm

    def _state_at(self, i: int) -> int:
        return self.n * self._row + i

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray | None] | None:
        """The prepared image (a read-only view of the mapping: the dataset's next step copies it
        anyway) and mask (a copy; ``None`` when the row has no mask) of row ``i``, or ``None`` when
        the row is not filled yet."""
        mm = self._map()
        state = int(mm[self._state_at(i)])
        if state == 0:
            return None
        c = self.crop
        row = mm[i * self._row:(i + 1) * self._row]
        img = np.asarray(row[: c * c * 3]).reshape(c, c, 3)
        img.flags.writeable = False
        mask = row[c * c * 3:].reshape(c, c).astype(bool) if state == 2 else None
        return img, mask

    def put(self, i: int, img: np.ndarray, mask: np.ndarray | None) -> None:
        """Write row ``i`` (image, then mask, then its state byte)."""
        c = self.crop
        if img.shape != (c, c, 3) or img.dtype != np.uint8:
            raise ValueError(f"cache row {i}: expected a uint8 image of shape {(c, c, 3)}, got {img.dtype} {img.shape}")
        mm = self._map()
        base = i * self._row
        mm[base:base + c * c * 3] = img.reshape(-1)
        if mask is not None:
            mm[base + c * c * 3:base + self._row] = np.asarray(mask, dtype=bool).reshape(-1).view(np.uint8)
        mm[self._state_at(i)] = 2 if mask is not None else 1

    def filled(self) -> int:
        """Number of rows written so far."""
        mm = self._map()
        return int(np.count_nonzero(mm[self.n * self._row:]))
