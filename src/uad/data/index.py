"""The sample index: one ``pandas.DataFrame`` row per image, whatever the dataset layout.

Columns (:data:`INDEX_COLUMNS`):

=============  ===============================================================================
dataset        dataset name (e.g. ``"mvtec"``, ``"synthetic"``)
class_name     object / texture category
split          ``"train"``, ``"validation"`` (held-out normals no method trains on: thresholds and
               calibration read them) or ``"test"``
label          0 normal, 1 anomalous
defect_type    ``"good"`` for normal images, else the defect folder / class name
image_path     path to the image file (the layout scanners write absolute paths)
mask_path      path to the ground-truth mask, ``""`` when there is none
=============  ===============================================================================

:func:`validate_index` checks an index against the files it points to and raises one
:class:`DatasetValidationError` that lists **every** problem found, one per line, each naming the
file (so a broken dataset is fixed in one pass, not one error at a time).
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from uad.errors import UadError

from .images import ImageReadError, image_size, load_image, read_mask_values

__all__ = [
    "INDEX_COLUMNS",
    "DatasetValidationError",
    "content_fingerprint",
    "empty_index",
    "index_fingerprint",
    "validate_index",
]

INDEX_COLUMNS: list[str] = ["dataset", "class_name", "split", "label", "defect_type", "image_path", "mask_path"]
_SPLITS = ("train", "validation", "test")
_REQUIRED = ("train", "test")


class DatasetValidationError(UadError, ValueError):
    """The sample index has problems; ``problems`` is the full list (one string per problem)."""

    def __init__(self, problems: Sequence[str]):
        self.problems = [str(p) for p in problems]
        n = len(self.problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"dataset validation found {n} problem{'s' if n != 1 else ''}:\n{lines}")

    def __reduce__(self):
        return (type(self), (self.problems,))


def empty_index() -> pd.DataFrame:
    """An index with the right columns and dtypes and no rows."""
    df = pd.DataFrame({c: pd.Series(dtype="object") for c in INDEX_COLUMNS})
    df["label"] = df["label"].astype("int64")
    return df


def _is_blank(v) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v)) or str(v) == ""


def _check_files(row: tuple, check_images: bool, full_decode: bool, mask_policy: str) -> list[str]:
    """Problems with one row's files. ``row = (split, label, image_path, mask_path)``."""
    split, label, img_path, mask_path = row
    problems: list[str] = []
    size = None
    if check_images and not _is_blank(img_path):
        try:
            if full_decode:
                arr = load_image(img_path)
                size = (arr.shape[1], arr.shape[0])
            else:
                size = image_size(img_path)
        except ImageReadError as exc:
            problems.append(f"unreadable image {exc.path}: {exc.reason}; replace or remove the file")
    if not _is_blank(mask_path):
        try:
            vals = read_mask_values(mask_path)
        except ImageReadError as exc:
            problems.append(f"unreadable mask {exc.path} (for image {img_path}): {exc.reason}; replace or remove the mask")
        else:
            if size is not None and (vals.shape[1], vals.shape[0]) != size:
                problems.append(
                    f"mask/image size mismatch: mask {mask_path} is {vals.shape[1]}x{vals.shape[0]}, "
                    f"image {img_path} is {size[0]}x{size[1]}; resize the mask to its image (nearest neighbour)"
                )
            uniq = np.unique(vals)
            positive = uniq[uniq > 0]
            if mask_policy == "binary" and positive.size > 1:
                shown = ", ".join(str(int(u)) for u in uniq[:8]) + (", ..." if uniq.size > 8 else "")
                problems.append(f"non-binary mask {mask_path}: values {{{shown}}} (expected 0 and one positive value); binarise it, or set data.mask_policy: nonzero")
            if label == 0 and positive.size > 0:
                problems.append(f"normal image {img_path} has a non-empty mask {mask_path}; move the image to a defect folder or empty the mask")
    return problems


def validate_index(
    df: pd.DataFrame,
    check_images: bool = True,
    max_workers: int | None = None,
    full_decode: bool = True,
    mask_policy: str = "binary",
    require_splits: Iterable[str] = _REQUIRED,
    progress: bool = False,
) -> None:
    """Check ``df`` and raise :class:`DatasetValidationError` listing every problem found.

    Checks: missing columns (reported alone, nothing else can be checked); bad ``split`` /
    ``label`` values; ``label`` inconsistent with ``defect_type`` (``good`` <=> 0); empty or
    duplicated image paths; classes with no rows in one of ``require_splits`` (default: no
    train or no test images); anomalous test images without a mask; and, file by file:
    unreadable images (every pixel decoded, so truncated or half-written files are caught here,
    not in the middle of training; ``full_decode=False`` reads headers only), unreadable masks
    (always fully decoded), mask/image size mismatch, non-binary masks and normal images with a
    non-empty mask. ``progress`` shows a progress bar over the files.

    ``mask_policy="binary"`` (default) accepts masks holding 0 and at most one positive value
    (0/255, 0/1, ...); ``"nonzero"`` accepts any values (nonzero = anomalous; use it for raw
    datasets that store defect ids in the mask). ``check_images=False`` skips reading image
    headers (masks are still read). File checks run on a thread pool of ``max_workers``
    (default ``min(8, cpu count)``) when there are more than 64 rows.
    """
    if mask_policy not in ("binary", "nonzero"):
        raise ValueError(f"mask_policy must be 'binary' or 'nonzero', got {mask_policy!r}")
    missing = [c for c in INDEX_COLUMNS if c not in df.columns]
    if missing:
        raise DatasetValidationError([f"index is missing columns {missing} (has {list(df.columns)})"])
    problems: list[str] = []
    if len(df) == 0:
        raise DatasetValidationError(["index has no rows"])

    splits = df["split"].astype(str)
    labels_raw = df["label"]
    bad_split = ~splits.isin(_SPLITS)
    for p, s in zip(df.loc[bad_split, "image_path"], splits[bad_split]):
        problems.append(f"bad split {s!r} for {p} (expected one of {list(_SPLITS)}); fix the split file")
    labels = pd.to_numeric(labels_raw, errors="coerce")
    bad_label = ~labels.isin([0, 1])
    for p, v in zip(df.loc[bad_label, "image_path"], labels_raw[bad_label]):
        problems.append(f"bad label {v!r} for {p} (expected 0 or 1); fix the split file")
    defect = df["defect_type"].astype(str)
    inconsistent = ~bad_label & ((labels == 0) != (defect == "good"))
    for p, v, d in zip(df.loc[inconsistent, "image_path"], labels[inconsistent], defect[inconsistent]):
        problems.append(f"label {int(v)} contradicts defect_type {d!r} for {p} (defect_type 'good' <=> label 0); fix the split file")

    img_paths = df["image_path"]
    blank = img_paths.map(_is_blank)
    for idx in np.flatnonzero(blank.to_numpy()):
        r = df.iloc[idx]
        problems.append(f"row {idx} ({r['dataset']}/{r['class_name']}/{r['split']}) has an empty image_path; fix the split file")
    dup = df.duplicated(subset=["split", "image_path"], keep="first") & ~blank
    for p, s in zip(img_paths[dup], splits[dup]):
        problems.append(f"duplicate image {p} in split {s!r}; list each image once")

    mask_paths = df["mask_path"]
    no_mask = mask_paths.map(_is_blank)
    bad_val = (splits == "validation") & (labels == 1)
    for p in img_paths[bad_val]:
        problems.append(f"anomalous image {p} in the validation split (validation holds normal images only); "
                        "move it to a test defect folder")
    need_mask = (splits == "test") & (labels == 1) & no_mask
    for p in img_paths[need_mask]:
        problems.append(f"anomalous test image without mask: {p}; add ground_truth/<defect>/<stem>_mask.png (or <stem>.png)")

    groups = df.assign(_split=splits).groupby(["dataset", "class_name"], sort=True)["_split"]
    for (ds, cls), sp in groups:
        present = set(sp)
        for s in require_splits:
            if s not in present:
                fix = ("add normal images under <root>/<class>/train/good" if s == "train" else
                       "add <root>/<class>/test/good (and defect folders with masks), or let ingest hold out normal "
                       "training images as the test split (data.normal_holdout: 0.2)")
                problems.append(f"class {ds}/{cls} has no {s} images; {fix}")

    rows = list(zip(splits, labels.fillna(-1).astype(int), img_paths, mask_paths))
    work = [r for r, b in zip(rows, blank) if not b]
    if check_images or (~no_mask).any():
        results = _map_files(lambda r: _check_files(r, check_images, full_decode, mask_policy), work, max_workers,
                             desc="ingest: decoding images and masks" if progress else None)
        for res in results:
            problems.extend(res)
    if problems:
        raise DatasetValidationError(problems)


def index_fingerprint(df: pd.DataFrame, root: str | os.PathLike | None = None) -> str:
    """``sha256`` hex digest of the index rows (columns of :data:`INDEX_COLUMNS`, rows sorted),
    independent of row order. With ``root``, paths under it are made relative first so the
    fingerprint does not depend on where the dataset is mounted."""
    missing = [c for c in INDEX_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"index is missing columns {missing}")
    sub = df[INDEX_COLUMNS].copy()
    for c in INDEX_COLUMNS:
        sub[c] = sub[c].map(lambda v: "" if _is_blank(v) else str(v))
    if root is not None:
        base = str(Path(root).expanduser().absolute())
        rel = lambda p: os.path.relpath(p, base) if p and Path(p).is_absolute() and (p + os.sep).startswith(base + os.sep) else p  # noqa: E731
        sub["image_path"] = sub["image_path"].map(rel)
        sub["mask_path"] = sub["mask_path"].map(rel)
    return _hash_lines(("\x1f".join(r) for r in sub.itertuples(index=False, name=None)),
                       ("\x1f".join(INDEX_COLUMNS) + "\n").encode())


def _hash_lines(lines: Iterable[str], header: bytes) -> str:
    """``sha256`` of ``header`` and the *sorted* lines (so row order does not matter)."""
    h = hashlib.sha256(header)
    for line in sorted(lines):
        h.update(line.encode("utf-8", "surrogateescape") + b"\n")
    return h.hexdigest()


def _map_files(fn, items: list, max_workers: int | None = None, desc: str | None = None) -> list:
    """``[fn(x) for x in items]`` on a thread pool of ``max_workers`` (default ``min(8, cpus)``) when
    there are more than 64 items: image decoding and file reads release the GIL. ``desc`` shows a
    progress bar with that label."""
    from uad.progress import progress

    nw = max_workers if max_workers is not None else min(8, os.cpu_count() or 1)
    bar = dict(total=len(items), desc=desc or "", unit="file", enabled=desc is not None)
    if len(items) > 64 and nw > 1:
        with ThreadPoolExecutor(max_workers=nw) as pool:
            return list(progress(pool.map(fn, items, chunksize=16), **bar))
    return [fn(x) for x in progress(items, **bar)]


#: where file digests are cached, keyed by (path, size, mtime, ctime, inode): ``$UAD_CACHE_DIR``
#: or ``$XDG_CACHE_HOME/uad`` (``~/.cache/uad``); a file whose stat is unchanged is not read again
def _cache_path() -> Path:
    root = os.environ.get("UAD_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                          os.path.expanduser("~/.cache"), "uad")
    return Path(root) / "file_digests.sqlite"


_CHUNK = 1 << 20


def _hash_file(path: str) -> str:
    """``size:blake2b`` of every byte of the file (read in 1 MiB chunks)."""
    h = hashlib.blake2b(digest_size=16)
    size = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            size += len(chunk)
            h.update(chunk)
    return f"{size}:{h.hexdigest()}"


class _DigestCache:
    """File digests by stat signature in one SQLite file (safe for concurrent runs; a cache only:
    any failure to open or write it falls back to hashing)."""

    def __init__(self) -> None:
        self._db = None
        try:
            import sqlite3

            path = _cache_path()
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), timeout=30, check_same_thread=False)
            self._db.execute("CREATE TABLE IF NOT EXISTS digests (path TEXT PRIMARY KEY, stat TEXT, digest TEXT)")
        except Exception:  # noqa: BLE001 - an unwritable cache only costs time
            self._db = None

    def get_many(self, stats: dict[str, str]) -> dict[str, str]:
        if self._db is None or not stats:
            return {}
        out: dict[str, str] = {}
        paths = list(stats)
        try:
            for s in range(0, len(paths), 500):
                part = paths[s:s + 500]
                rows = self._db.execute(f"SELECT path, stat, digest FROM digests WHERE path IN ({','.join('?' * len(part))})",
                                        part).fetchall()
                out.update({p: d for p, st, d in rows if stats.get(p) == st})
        except Exception:  # noqa: BLE001
            return {}
        return out

    def put_many(self, rows: list[tuple[str, str, str]]) -> None:
        if self._db is None or not rows:
            return
        try:
            with self._db:
                self._db.executemany("INSERT OR REPLACE INTO digests (path, stat, digest) VALUES (?, ?, ?)", rows)
        except Exception:  # noqa: BLE001
            pass

    def close(self) -> None:
        if self._db is not None:
            self._db.close()


def _stat_key(path: str) -> str | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}:{st.st_dev}"


def file_digests(paths: list[str], max_workers: int | None = None) -> dict[str, str]:
    """``size:blake2b`` of every byte of each file (``missing`` when it cannot be read), hashed once
    and then cached by the file's stat signature: size, modification and change times, inode. A
    change anywhere in the file (the middle rows of an uncompressed BMP or TIFF included) changes
    its digest; an unchanged file is not read again."""
    real = {p: os.path.realpath(p) for p in paths}
    stats = {r: _stat_key(r) for r in set(real.values())}
    cache = _DigestCache()
    try:
        known = cache.get_many({r: s for r, s in stats.items() if s is not None})
        todo = sorted(r for r, s in stats.items() if s is not None and r not in known)

        def digest(r: str) -> str:
            try:
                return _hash_file(r)
            except OSError:
                return "missing"

        fresh = dict(zip(todo, _map_files(digest, todo, max_workers,
                                          desc="hashing files" if len(todo) > 2000 else None)))
        cache.put_many([(r, stats[r], d) for r, d in fresh.items() if d != "missing"])
    finally:
        cache.close()
    found = {**known, **fresh}
    return {p: found.get(r, "missing") for p, r in real.items()}


def content_fingerprint(df: pd.DataFrame, max_workers: int | None = None) -> str:
    """What decides a training run's data, independent of where the dataset lies: for every row
    its dataset, class, split, label, defect type, the *file names* of image and mask and a digest
    of every byte of their contents (:func:`file_digests`, cached by stat). A moved project or dataset keeps the
    fingerprint; replaced images (same names) change it. ``sha256`` hex digest, row order free."""
    missing = [c for c in INDEX_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"index is missing columns {missing}")
    paths = sorted({str(p) for col in ("image_path", "mask_path") for p in df[col] if not _is_blank(p)})
    digests = file_digests(paths, max_workers)

    def describe(p) -> str:
        return "" if _is_blank(p) else f"{Path(str(p)).name}@{digests[str(p)]}"

    return _hash_lines(("\x1f".join([str(r.dataset), str(r.class_name), str(r.split), str(r.label),
                                      str(r.defect_type), describe(r.image_path), describe(r.mask_path)])
                        for r in df[INDEX_COLUMNS].itertuples(index=False)), b"content-v2\n")
