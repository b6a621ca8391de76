"""MVTec AD 2 submission folders: the continuous and thresholded anomaly maps of the two test sets
without public ground truth, in the layout and file format the evaluation server takes, checked
as the dataset's own upload checker checks them (and a little more: sizes).

Layout (the dataset's public code README, "check_and_prepare_data_for_upload")::

    <folder>/anomaly_images/<object>/test_private/<stem>.tiff          float16, one channel
    <folder>/anomaly_images/<object>/test_private_mixed/<stem>.tiff
    <folder>/anomaly_images_thresholded/<object>/<split>/<stem>.png    uint8, values {0, 255}

``<stem>`` is the source image's (``000_regular``, ``000_mixed``, ...); every map has the source
image's own height and width. The TIFF is written here (no TIFF library is a dependency): a
baseline little-endian TIFF 6.0 file, one IFD, one strip, Deflate (zlib, compression 8),
``BitsPerSample 16``, ``SampleFormat 3`` (IEEE float), ``PhotometricInterpretation 1``; the same
module reads it back for the check (and refuses any other TIFF it did not write).

Core library: numpy, PIL; no kedro, no mlflow.
"""

from __future__ import annotations

import io
import logging
import os
import struct
import tarfile
import zlib
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from uad.errors import UadError
from uad.osutil import atomic_write_bytes

log = logging.getLogger(__name__)

__all__ = ["SubmissionError", "SPLITS", "check_submission", "pack_submission", "read_float16_tiff",
           "submission_paths", "write_float16_tiff", "write_map_pair"]

SPLITS: tuple[str, ...] = ("test_private", "test_private_mixed")
_DIRS = ("anomaly_images", "anomaly_images_thresholded")


class SubmissionError(UadError, ValueError):
    """A submission folder the server would refuse; ``problems`` lists every one found."""

    def __init__(self, folder: str | os.PathLike, problems: list[str]):
        self.problems = list(problems)
        shown = "\n".join(f"  - {p}" for p in self.problems[:20])
        more = f"\n  ... and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
        super().__init__(f"submission folder {folder} fails {len(self.problems)} check(s); write it again with "
                         f"kedro run --pipeline=submission:\n{shown}{more}")


# ---- TIFF (float16, one channel) -----------------------------------------------------------------
_TAGS = {"width": 256, "height": 257, "bits": 258, "compression": 259, "photometric": 262, "offsets": 273,
         "spp": 277, "rows": 278, "counts": 279, "planar": 284, "sampleformat": 339}


def write_float16_tiff(path: str | os.PathLike, arr: np.ndarray) -> None:
    """Write a 2-D map as a float16 TIFF (see the module docstring), atomically."""
    a = np.ascontiguousarray(np.asarray(arr, dtype="<f2"))
    if a.ndim != 2:
        raise ValueError(f"a submission map is 2-D, got shape {a.shape}")
    h, w = a.shape
    data = zlib.compress(a.tobytes(), 6)
    entries = [(_TAGS["width"], 4, 1, w), (_TAGS["height"], 4, 1, h), (_TAGS["bits"], 3, 1, 16),
               (_TAGS["compression"], 3, 1, 8), (_TAGS["photometric"], 3, 1, 1), (_TAGS["offsets"], 4, 1, 8),
               (_TAGS["spp"], 3, 1, 1), (_TAGS["rows"], 4, 1, h), (_TAGS["counts"], 4, 1, len(data)),
               (_TAGS["planar"], 3, 1, 1), (_TAGS["sampleformat"], 3, 1, 3)]
    ifd_at = 8 + len(data) + (len(data) & 1)
    out = io.BytesIO()
    out.write(b"II*\x00" + struct.pack("<I", ifd_at))
    out.write(data + b"\x00" * (len(data) & 1))
    out.write(struct.pack("<H", len(entries)))
    for tag, typ, count, value in sorted(entries):
        out.write(struct.pack("<HHI", tag, typ, count) + (struct.pack("<HH", value, 0) if typ == 3 else struct.pack("<I", value)))
    out.write(struct.pack("<I", 0))
    atomic_write_bytes(path, out.getvalue())


def read_float16_tiff(path: str | os.PathLike) -> np.ndarray:
    """Read back a TIFF written by :func:`write_float16_tiff` (one IFD, one strip, Deflate or none,
    16-bit float, one channel); ``ValueError`` names what differs for any other file."""
    raw = Path(path).read_bytes()
    if raw[:4] != b"II*\x00":
        raise ValueError("not a little-endian TIFF")
    (ifd,) = struct.unpack_from("<I", raw, 4)
    (n,) = struct.unpack_from("<H", raw, ifd)
    tags: dict[int, int] = {}
    for k in range(n):
        tag, typ, count, value = struct.unpack_from("<HHII", raw, ifd + 2 + 12 * k)
        if tag not in _TAGS.values():
            continue  # descriptions, resolutions...: not needed to read the samples
        if count != 1:
            raise ValueError(f"tag {tag} has {count} values (one strip, one channel expected)")
        tags[tag] = value & 0xFFFF if typ == 3 else value
    if tags.get(_TAGS["spp"], 1) != 1:
        raise ValueError(f"{tags[_TAGS['spp']]} channels (one expected)")
    if tags.get(_TAGS["bits"]) != 16 or tags.get(_TAGS["sampleformat"]) != 3:
        raise ValueError(f"samples are {tags.get(_TAGS['bits'])}-bit format {tags.get(_TAGS['sampleformat'], 1)} "
                         "(float16: 16-bit format 3 expected)")
    w, h = tags[_TAGS["width"]], tags[_TAGS["height"]]
    strip = raw[tags[_TAGS["offsets"]]:tags[_TAGS["offsets"]] + tags[_TAGS["counts"]]]
    comp = tags.get(_TAGS["compression"], 1)
    if comp == 8:
        strip = zlib.decompress(strip)
    elif comp != 1:
        raise ValueError(f"compression {comp} (Deflate 8 or none expected)")
    return np.frombuffer(strip, dtype="<f2", count=w * h).reshape(h, w)


# ---- writing -------------------------------------------------------------------------------------
def submission_paths(folder: str | os.PathLike, class_name: str, split: str, image_path: str) -> tuple[Path, Path]:
    """``(continuous .tiff, thresholded .png)`` paths of one source image."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    stem = Path(image_path).stem
    root = Path(folder)
    return (root / _DIRS[0] / class_name / split / f"{stem}.tiff",
            root / _DIRS[1] / class_name / split / f"{stem}.png")


def write_map_pair(folder: str | os.PathLike, class_name: str, split: str, image_path: str, amap: np.ndarray,
                   threshold: float) -> None:
    """One image's continuous map (float16 TIFF) and its binarisation ``map >= threshold`` (PNG,
    0 / 255), both at the map's size (the image's own). Non-finite values are refused."""
    from PIL import Image

    a = np.asarray(amap, dtype=np.float32)
    if a.ndim != 2 or not np.isfinite(a).all():
        raise ValueError(f"the map of {image_path} is not a finite 2-D array (shape {a.shape})")
    # float16 saturates above 65504: clip so the file holds no inf
    cont, thr = submission_paths(folder, class_name, split, image_path)
    write_float16_tiff(cont, np.clip(a, -65504.0, 65504.0))
    buf = io.BytesIO()
    Image.fromarray(np.where(a >= np.float32(threshold), 255, 0).astype(np.uint8), mode="L").save(buf, format="PNG")
    atomic_write_bytes(thr, buf.getvalue())


# ---- checking ------------------------------------------------------------------------------------
def _image_size(path: str) -> tuple[int, int]:
    from uad.data.images import image_size

    w, h = image_size(path)
    return int(h), int(w)


def check_submission(folder: str | os.PathLike, expected: Iterable[Mapping[str, Any]],
                     official_counts: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Check ``folder`` against the ``expected`` source images (rows with ``class_name``,
    ``split``, ``image_path``): the two top folders and nothing else; per folder exactly the
    expected classes, per class exactly the two splits, per split exactly one file per source
    image named by its stem (``.tiff`` / ``.png``); every TIFF a 2-D float16 map, every PNG 2-D
    with values in {0, 255}, both at the source image's height and width. With
    ``official_counts`` (``{object: images per split}``, the dataset checker's table) the classes
    must be exactly those objects and the counts those numbers. Raises :class:`SubmissionError`
    listing every problem; returns ``{"files": n, "classes": [...], "maps_per_split": {...}}``."""
    from PIL import Image

    root = Path(folder)
    rows = list(expected)
    problems: list[str] = []
    want: dict[tuple[str, str], dict[str, str]] = {}
    for r in rows:
        want.setdefault((str(r["class_name"]), str(r["split"])), {})[Path(str(r["image_path"])).stem] = str(r["image_path"])
    classes = sorted({c for c, _ in want})
    if official_counts is not None:
        if set(classes) != set(official_counts):
            problems.append(f"objects {classes} are not MVTec AD 2's {sorted(official_counts)}")
        for (c, sp), stems in sorted(want.items()):
            if c in official_counts and len(stems) != official_counts[c]:
                problems.append(f"{c}/{sp}: {len(stems)} source images, the server expects {official_counts[c]}")
    if not root.is_dir():
        raise SubmissionError(root, [f"{root} is not a folder"])
    extra = sorted(p.name for p in root.iterdir() if p.name not in _DIRS)
    if extra:
        problems.append(f"{root}: superfluous entries {extra} (only {list(_DIRS)})")
    n_files = 0
    for top, ext in zip(_DIRS, (".tiff", ".png")):
        tdir = root / top
        if not tdir.is_dir():
            problems.append(f"missing folder {tdir}")
            continue
        found = sorted(p.name for p in tdir.iterdir())
        if found != classes:
            problems.append(f"{tdir}: classes {found}, expected {classes}")
        for c in classes:
            cdir = tdir / c
            splits = sorted(p.name for p in cdir.iterdir()) if cdir.is_dir() else []
            if splits != sorted(SPLITS):
                problems.append(f"{cdir}: holds {splits}, expected {list(SPLITS)}")
            for sp in SPLITS:
                stems = want.get((c, sp), {})
                sdir = cdir / sp
                files = sorted(p.name for p in sdir.iterdir()) if sdir.is_dir() else []
                names = sorted(f"{s}{ext}" for s in stems)
                if files != names:
                    missing, spurious = sorted(set(names) - set(files)), sorted(set(files) - set(names))
                    problems.append(f"{sdir}: {len(files)} files for {len(names)} images"
                                    + (f"; missing {missing[:4]}" if missing else "")
                                    + (f"; superfluous {spurious[:4]}" if spurious else ""))
                for stem, src in stems.items():
                    f = sdir / f"{stem}{ext}"
                    if not f.is_file():
                        continue
                    n_files += 1
                    try:
                        if ext == ".tiff":
                            arr = read_float16_tiff(f)
                        else:
                            with Image.open(f) as im:
                                arr = np.asarray(im)
                            if arr.ndim == 2 and not np.isin(np.unique(arr), (0, 255)).all():
                                problems.append(f"{f}: values other than 0 and 255")
                    except (OSError, ValueError) as exc:
                        problems.append(f"{f}: unreadable ({exc})")
                        continue
                    if arr.ndim != 2:
                        problems.append(f"{f}: {arr.ndim}-D, one channel expected")
                    elif arr.shape != _image_size(src):
                        problems.append(f"{f}: {arr.shape[1]}x{arr.shape[0]}, its image {src} is "
                                        f"{_image_size(src)[1]}x{_image_size(src)[0]}")
    if problems:
        raise SubmissionError(root, problems)
    return {"files": n_files, "classes": classes,
            "maps_per_split": {f"{c}/{sp}": len(v) for (c, sp), v in sorted(want.items())}}


def pack_submission(folder: str | os.PathLike) -> Path:
    """``<folder>.tar.gz`` holding ``<folder name>/anomaly_images...`` (what the dataset's checker
    packs for upload), written atomically beside the folder."""
    root = Path(folder)
    out = root.with_name(root.name + ".tar.gz")
    part = out.with_name(f".{out.name}.{os.getpid()}.part")
    try:
        with tarfile.open(part, mode="w:gz", compresslevel=1) as tar:
            for top in _DIRS:
                for p in sorted((root / top).rglob("*")):
                    if p.is_file():
                        tar.add(p, arcname=str(Path(root.name) / p.relative_to(root)))
        os.replace(part, out)
    finally:
        part.unlink(missing_ok=True)
    return out
