"""A folder of new, unlabelled images to score (inference), as a sample index.

Any nesting; ``.png .jpg .jpeg .bmp .tif .tiff`` (any case). Every file is fully decoded once, so
an unreadable, truncated or non-image file is found here, reported with its reason and left out
of the batch instead of stopping it. Optional masks come from a second folder: a mask matches an
image with the same relative path and stem (``<stem>.png`` or ``<stem>_mask.png``, any extension).
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from uad.errors import DatasetRootError

from .images import load_image, load_mask
from .index import _map_files

__all__ = ["IMAGE_SUFFIXES", "scan_image_folder"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _problem(path: str, load) -> str:
    try:
        load(path)
    except Exception as e:  # ImageReadError names the file; any other failure is reported the same way
        return str(e) or type(e).__name__
    return ""


def scan_image_folder(images: str | os.PathLike, masks: str | os.PathLike | None = None,
                      progress: bool = True) -> pd.DataFrame:
    """One row per image file under ``images``: ``image_path``, ``relative_path``, ``mask_path``
    (``""`` without one), ``status`` (``ok`` / ``unreadable``) and ``error`` (why), plus the index
    columns the datasets expect (``class_name`` = the first folder level or ``"."``, ``label`` 0,
    ``split`` ``infer``). Raises :class:`~uad.errors.DatasetRootError` when the folder is missing
    or holds no image file."""
    root = Path(images).expanduser()
    if not root.is_dir():
        raise DatasetRootError(f"infer.images {root} is not a folder")
    files = _files(root)
    if not files:
        raise DatasetRootError(f"infer.images {root} holds no image file ({', '.join(IMAGE_SUFFIXES)}, any nesting)")
    mask_of: dict[tuple[str, str], str] = {}
    if masks:
        mroot = Path(masks).expanduser()
        if not mroot.is_dir():
            raise DatasetRootError(f"infer.masks {mroot} is not a folder")
        for m in _files(mroot):
            rel = m.relative_to(mroot)
            stem = rel.stem[:-5] if rel.stem.endswith("_mask") else rel.stem
            mask_of[(str(rel.parent), stem)] = str(m)
    rows = []
    for f in files:
        rel = f.relative_to(root)
        rows.append({"image_path": str(f), "relative_path": rel.as_posix(),
                     "mask_path": mask_of.get((str(rel.parent), rel.stem), ""),
                     "class_name": rel.parts[0] if len(rel.parts) > 1 else ".", "label": 0, "split": "infer",
                     "defect_type": ""})
    df = pd.DataFrame(rows)
    errors = _map_files(lambda p: _problem(p, load_image), df["image_path"].tolist(),
                        desc="infer: decoding images" if progress else None)
    mask_errors = _map_files(lambda p: _problem(p, load_mask) if p else "", df["mask_path"].tolist())
    df["error"] = [e or (f"mask {m}: {me}" if me else "") for e, m, me in zip(errors, df["mask_path"], mask_errors)]
    df.loc[[bool(me) and not e for e, me in zip(errors, mask_errors)], "mask_path"] = ""  # a bad mask: score the image anyway
    df["status"] = ["unreadable" if e else "ok" for e in errors]
    return df
