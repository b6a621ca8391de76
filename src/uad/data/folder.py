"""A folder of new, unlabelled images to score (inference), as a sample index.

Any nesting; ``.png .jpg .jpeg .bmp .tif .tiff`` (any case). Listing only: the files are decoded
once, when they are scored (:class:`uad.data.torch_data.SkipUnreadable` turns an unreadable one
into a flagged sample instead of an error). Optional masks come from a second folder: a mask
matches an image with the same relative path and stem (``<stem>.png`` or ``<stem>_mask.png``, any
extension).
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from uad.errors import DatasetRootError


__all__ = ["IMAGE_SUFFIXES", "scan_image_folder"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def scan_image_folder(images: str | os.PathLike, masks: str | os.PathLike | None = None) -> pd.DataFrame:
    """One row per image file under ``images``: ``image_path``, ``relative_path``, ``mask_path``
    (``""`` without one), plus the index columns the datasets expect (``class_name`` = the first
    folder level or ``"."``, ``label`` 0, ``split`` ``infer``). Raises
    :class:`~uad.errors.DatasetRootError` when the folder is missing or holds no image file."""
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
    return pd.DataFrame(rows)
