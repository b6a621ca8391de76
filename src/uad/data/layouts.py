"""Dataset layout adapters: a folder on disk -> a sample index (:mod:`uad.data.index`).

:func:`scan_dataset` understands these layouts (``layout="auto"`` detects them):

``mvtec`` (MVTec-AD; ``mpdd`` is an alias, MPDD ships the same tree)::

    <root>/<class>/train/good/*.png
    <root>/<class>/test/<defect>/*.png               (``good`` = normal)
    <root>/<class>/ground_truth/<defect>/<stem>_mask.png   (``<stem>.png`` also accepted)

``mvtec_ad2`` (MVTec AD 2, Heckler-Kram et al., arXiv 2503.21622, 2025)::

    <root>/<class>/train/good/*.png                       split train
    <root>/<class>/validation/good/*.png                  split validation (held-out normals: thresholds)
    <root>/<class>/test_public/good/*.png                 split test, label 0
    <root>/<class>/test_public/bad/*.png                  split test, label 1, defect_type "bad"
    <root>/<class>/test_public/ground_truth/bad/<stem>_mask.png
    <root>/<class>/test_private/*.png, test_private_mixed/*.png
                                                          no ground truth: not in the index;
                                                          :func:`scan_unlabelled` lists them

``btad`` (BTAD; images are .bmp or .png and masks may use another extension than their image)::

    <root>/<class>/train/ok/*
    <root>/<class>/test/ok/*,  <root>/<class>/test/ko/*
    <root>/<class>/ground_truth/ko/<stem>.<any image extension>

``mvtec3d`` (MVTec 3D-AD, RGB only; ``xyz/`` is ignored, and so is ``validation/`` unless
``include_validation=True`` which adds its good images to the train split)::

    <root>/<class>/train/good/rgb/*.png
    <root>/<class>/test/<defect>/rgb/*.png,  <root>/<class>/test/<defect>/gt/<stem>.png
    (the all-zero ``gt`` of ``good`` test images is not used: normal rows have no mask)

``visa`` (VisA with its official one-class split)::

    <root>/split_csv/1cls.csv   columns object,split,label,image,mask
                                (label normal/anomaly; paths relative to <root>)

  VisA's CSV has no defect names: anomalous rows get ``defect_type="anomaly"``. Raw VisA masks
  store defect ids rather than 0/255; validate them with ``mask_policy="nonzero"`` (see
  :func:`uad.data.index.validate_index`) or convert them first.

``realiad`` (Real-IAD with its official JSON splits)::

    <root>/realiad_jsons/<class>.json   {"meta": {...},
                                         "train": [{"category", "anomaly_class", "image_path",
                                                    "mask_path"}, ...],
                                         "test": [...]}

  ``anomaly_class == "OK"`` is normal, anything else (``AK``, ``BX``, ``CH``, ``HS``, ``PS``,
  ``QS``, ``YW``, ``ZW``) is the defect type; ``image_path`` / ``mask_path`` are relative to
  ``<image_dir>/<class>/``. ``json_dir`` defaults to ``<root>/realiad_jsons`` (or the nested
  ``<root>/realiad_jsons/realiad_jsons`` of the official archive); pass another one for the
  single-view (``realiad_jsons_sv``) or noisy (``realiad_jsons_fuiad_*``) variants. ``image_dir``
  defaults to the first of ``realiad_1024``, ``realiad_512``, ``realiad_256``, ``realiad_raw``
  under ``<root>`` that exists, else ``<root>`` itself. This follows the structure of the files of
  the official release (as used by its own loader and by Dinomaly / INP-Former); ``meta`` is not
  read.

Folder layouts name the sub-folders of a class they read; any other sub-folder of a class (an
MVTec AD 2 tree read as ``mvtec``: ``validation``, ``test_public``...) is logged as a warning
naming it, never dropped silently.

Every scanner returns absolute paths, ``mask_path=""`` for rows without a mask, rows sorted by
``(class_name, split, label, defect_type, image_path)`` and a fresh 0..n-1 index, so the same tree
always gives the same index. Image extensions: png, jpg, jpeg, bmp, tif, tiff (any case).
Hidden entries (``.name``) are ignored.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

import pandas as pd

from uad.errors import DatasetLayoutError, DatasetRootError

from .images import IMAGE_EXTENSIONS
from .index import INDEX_COLUMNS, empty_index

log = logging.getLogger(__name__)

__all__ = ["LAYOUTS", "UNLABELLED_SPLITS", "detect_layout", "scan_dataset", "scan_unlabelled"]

LAYOUTS: tuple[str, ...] = ("mvtec", "mpdd", "mvtec_ad2", "btad", "mvtec3d", "visa", "realiad", "folder")
#: MVTec AD 2's test sets without public ground truth (scored for the evaluation server)
UNLABELLED_SPLITS: tuple[str, ...] = ("test_private", "test_private_mixed")
_REALIAD_IMAGE_DIRS = ("realiad_1024", "realiad_512", "realiad_256", "realiad_raw")


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if _is_image(p)), key=lambda p: p.name)


def _subdirs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _find_by_stem(folder: Path, stems: Sequence[str]) -> str:
    """First image file in ``folder`` whose stem is one of ``stems`` (in order), any extension."""
    if not folder.is_dir():
        return ""
    for stem in stems:
        for ext in IMAGE_EXTENSIONS:
            for cand in (folder / f"{stem}{ext}", folder / f"{stem}{ext.upper()}"):
                if cand.is_file():
                    return str(cand.absolute())
    # slow path: case-insensitive match on the stem
    by_stem = {p.stem.lower(): p for p in _images_in(folder)}
    for stem in stems:
        p = by_stem.get(stem.lower())
        if p is not None:
            return str(p.absolute())
    return ""


def _row(dataset, cls, split, label, defect, image, mask="") -> dict:
    return {"dataset": dataset, "class_name": cls, "split": split, "label": int(label), "defect_type": defect,
            "image_path": str(Path(image).absolute()), "mask_path": str(Path(mask).absolute()) if mask else ""}


def _class_dirs(root: Path, marker: Callable[[Path], bool]) -> list[Path]:
    return [d for d in _subdirs(root) if marker(d)]


# --- adapters ------------------------------------------------------------------------------


def _scan_mvtec(root: Path, dataset: str, **_) -> list[dict]:
    rows = []
    for cdir in _class_dirs(root, lambda d: (d / "train" / "good").is_dir() or (d / "test").is_dir()):
        cls = cdir.name
        for p in _images_in(cdir / "train" / "good"):
            rows.append(_row(dataset, cls, "train", 0, "good", p))
        for ddir in _subdirs(cdir / "test"):
            defect = ddir.name
            for p in _images_in(ddir):
                if defect == "good":
                    rows.append(_row(dataset, cls, "test", 0, "good", p))
                else:
                    gt = _find_by_stem(cdir / "ground_truth" / defect, [f"{p.stem}_mask", p.stem])
                    rows.append(_row(dataset, cls, "test", 1, defect, p, gt))
    return rows


def _scan_mvtec_ad2(root: Path, dataset: str, **_) -> list[dict]:
    rows = []
    for cdir in _class_dirs(root, lambda d: (d / "train" / "good").is_dir() or (d / "test_public").is_dir()):
        cls = cdir.name
        for p in _images_in(cdir / "train" / "good"):
            rows.append(_row(dataset, cls, "train", 0, "good", p))
        for p in _images_in(cdir / "validation" / "good"):
            rows.append(_row(dataset, cls, "validation", 0, "good", p))
        for p in _images_in(cdir / "test_public" / "good"):
            rows.append(_row(dataset, cls, "test", 0, "good", p))
        for ddir in _subdirs(cdir / "test_public"):
            if ddir.name in ("good", "ground_truth"):
                continue
            for p in _images_in(ddir):
                gt = _find_by_stem(cdir / "test_public" / "ground_truth" / ddir.name, [f"{p.stem}_mask", p.stem])
                rows.append(_row(dataset, cls, "test", 1, ddir.name, p, gt))
    return rows


def scan_unlabelled(root: str | os.PathLike, classes: Iterable[str] | None = None,
                    dataset_name: str | None = None) -> pd.DataFrame:
    """MVTec AD 2's test sets without public ground truth (:data:`UNLABELLED_SPLITS`:
    ``<root>/<class>/test_private/*.png``, ``test_private_mixed/*.png``) as an index frame with
    the index columns: ``split`` the folder's name, ``label`` -1 (unknown), ``defect_type``
    ``"unknown"``, no mask. Empty for a tree without them. Listing only (nothing decoded)."""
    root = Path(root).expanduser().absolute()
    wanted = None if classes is None else {str(c) for c in classes}
    name = dataset_name if dataset_name is not None else root.name
    rows = [_row(name, cdir.name, split, 0, "unknown", p)
            for cdir in _subdirs(root) if wanted is None or cdir.name in wanted
            for split in UNLABELLED_SPLITS for p in _images_in(cdir / split)]
    df = pd.DataFrame(rows, columns=INDEX_COLUMNS) if rows else empty_index()
    df["label"] = -1
    df = df.sort_values(["class_name", "split", "image_path"], kind="mergesort").reset_index(drop=True)
    df["label"] = df["label"].astype("int64")
    return df[INDEX_COLUMNS]


def _scan_folder(root: Path, dataset: str, **_) -> list[dict]:
    """A flat folder of normal images: one class (the folder's name), training images only (the
    ingest holds out some as the test split, ``data.normal_holdout``)."""
    return [_row(dataset, root.name, "train", 0, "good", p) for p in _images_in(root)]


def _scan_btad(root: Path, dataset: str, **_) -> list[dict]:
    rows = []
    for cdir in _class_dirs(root, lambda d: (d / "train" / "ok").is_dir() or (d / "test").is_dir()):
        cls = cdir.name
        for p in _images_in(cdir / "train" / "ok"):
            rows.append(_row(dataset, cls, "train", 0, "good", p))
        for ddir in _subdirs(cdir / "test"):
            defect = ddir.name
            normal = defect.lower() == "ok"
            for p in _images_in(ddir):
                if normal:
                    rows.append(_row(dataset, cls, "test", 0, "good", p))
                else:
                    gt = _find_by_stem(cdir / "ground_truth" / defect, [p.stem, f"{p.stem}_mask"])
                    rows.append(_row(dataset, cls, "test", 1, defect, p, gt))
    return rows


def _scan_mvtec3d(root: Path, dataset: str, include_validation: bool = False, **_) -> list[dict]:
    rows = []
    for cdir in _class_dirs(root, lambda d: (d / "train" / "good" / "rgb").is_dir() or (d / "test").is_dir()):
        cls = cdir.name
        train_dirs = [cdir / "train" / "good" / "rgb"]
        if include_validation:
            train_dirs.append(cdir / "validation" / "good" / "rgb")
        for tdir in train_dirs:
            for p in _images_in(tdir):
                rows.append(_row(dataset, cls, "train", 0, "good", p))
        for ddir in _subdirs(cdir / "test"):
            defect = ddir.name
            for p in _images_in(ddir / "rgb"):
                if defect == "good":
                    rows.append(_row(dataset, cls, "test", 0, "good", p))
                else:
                    gt = _find_by_stem(ddir / "gt", [p.stem, f"{p.stem}_mask"])
                    rows.append(_row(dataset, cls, "test", 1, defect, p, gt))
    return rows


def _scan_visa(root: Path, dataset: str, split_csv: str | os.PathLike | None = None, **_) -> list[dict]:
    csv_path = Path(split_csv) if split_csv is not None else root / "split_csv" / "1cls.csv"
    if not csv_path.is_absolute() and not csv_path.exists():
        csv_path = root / csv_path
    if not csv_path.is_file():
        raise DatasetRootError(f"VisA split file not found: {csv_path}; put VisA's split_csv/1cls.csv under the root "
                              f"or name the file with split_csv")
    with open(csv_path, newline="") as fh:
        reader = csv.DictReader(fh)
        need = {"object", "split", "label", "image", "mask"}
        cols = {(c or "").strip() for c in (reader.fieldnames or [])}
        if not need <= cols:
            raise DatasetLayoutError(f"{csv_path}: expected columns {sorted(need)}, found {sorted(cols)}; use the format of "
                                     f"VisA's split_csv/1cls.csv")
        records = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
    rows = []
    for r in records:
        split = r["split"].lower()
        lab = r["label"].lower()
        if lab not in ("normal", "anomaly"):
            raise DatasetLayoutError(f"{csv_path}: unknown label {r['label']!r} for {r['image']} (expected normal/anomaly); fix that row of the split file")
        anomalous = lab == "anomaly"
        mask = str(_inside(root, r["mask"], csv_path)) if (r["mask"] and anomalous) else ""
        rows.append(_row(dataset, r["object"], split, int(anomalous), "anomaly" if anomalous else "good",
                         _inside(root, r["image"], csv_path), mask))
    return rows


def _inside(root: Path, entry: str, split_file: Path) -> Path:
    """``root / entry`` when it stays inside ``root`` as written (no absolute path, no ``..`` out of
    it); a split-file entry that points elsewhere (``/etc/passwd``, ``../../secret.png``) is refused:
    a split file must not make ingest read files outside the dataset. Symlinks inside the tree (a
    class folder on another disk) are the dataset's own business and stay allowed."""
    base = os.path.normpath(os.path.abspath(root))
    path = os.path.normpath(os.path.join(base, entry))
    if os.path.isabs(entry) or os.path.commonpath([base, path]) != base:
        raise DatasetLayoutError(f"{split_file}: the entry {entry!r} points outside the dataset root {base}; "
                                 "split files may only name files under the root: fix that row")
    return root / entry


def _realiad_json_dir(root: Path, json_dir: str | os.PathLike | None) -> Path:
    if json_dir is not None:
        jd = Path(json_dir)
        if not jd.is_absolute() and not jd.exists():
            jd = root / jd
        if not jd.is_dir():
            raise DatasetRootError(f"Real-IAD json_dir not found: {jd}; point json_dir at the folder of <class>.json split files")
        return jd
    jd = root / "realiad_jsons"
    if not any(jd.glob("*.json")) and (jd / "realiad_jsons").is_dir():
        jd = jd / "realiad_jsons"
    if not jd.is_dir():
        raise DatasetRootError(f"Real-IAD json folder not found: {jd}; unpack realiad_jsons/ under the root or set json_dir")
    return jd


def _scan_realiad(
    root: Path,
    dataset: str,
    json_dir: str | os.PathLike | None = None,
    image_dir: str | os.PathLike | None = None,
    classes: Sequence[str] | None = None,
    **_,
) -> list[dict]:
    jd = _realiad_json_dir(root, json_dir)
    if image_dir is not None:
        idir = Path(image_dir)
        if not idir.is_absolute() and not idir.exists():
            idir = root / idir
    else:
        idir = next((root / d for d in _REALIAD_IMAGE_DIRS if (root / d).is_dir()), root)
    available = sorted(p.stem for p in jd.glob("*.json"))
    if classes is not None:
        unknown = [c for c in classes if c not in available]
        if unknown:
            raise DatasetLayoutError(f"classes {unknown} have no split file in {jd}; set data.classes to some of: {available}")
    rows = []
    for jpath in sorted(jd.glob("*.json")):
        cls = jpath.stem
        if classes is not None and cls not in classes:
            continue  # avoid parsing big JSON files of classes we do not want
        try:
            spec = json.loads(jpath.read_text())
        except (OSError, ValueError) as exc:
            raise DatasetLayoutError(f"cannot parse Real-IAD split file {jpath}: {exc}; restore it from the dataset") from exc
        base = idir / cls
        for split in ("train", "test"):
            for item in spec.get(split, []) or []:
                ac = str(item.get("anomaly_class", "OK"))
                normal = ac.upper() == "OK"
                mask = item.get("mask_path") or ""
                rows.append(_row(dataset, str(item.get("category") or cls), split, int(not normal),
                                 "good" if normal else ac, _inside(base, str(item["image_path"]), jpath),
                                 _inside(base, str(mask), jpath) if (mask and not normal) else ""))
    return rows


_ADAPTERS: dict[str, Callable[..., list[dict]]] = {
    "mvtec": _scan_mvtec,
    "mpdd": _scan_mvtec,
    "mvtec_ad2": _scan_mvtec_ad2,
    "btad": _scan_btad,
    "mvtec3d": _scan_mvtec3d,
    "visa": _scan_visa,
    "realiad": _scan_realiad,
    "folder": _scan_folder,
}


#: folder layouts (classes are sub-folders of the root) and where their training images live
_FOLDER_LAYOUTS = {"mvtec": "<class>/train/good/*.png", "mpdd": "<class>/train/good/*.png",
                   "mvtec_ad2": "<class>/train/good/*.png",
                   "btad": "<class>/train/ok/*", "mvtec3d": "<class>/train/good/rgb/*.png"}
#: the sub-folders of a class each folder layout reads (any other is reported)
_CLASS_SUBFOLDERS = {"mvtec": {"train", "test", "ground_truth"}, "mpdd": {"train", "test", "ground_truth"},
                     "mvtec_ad2": {"train", "validation", "test_public", *UNLABELLED_SPLITS},
                     "btad": {"train", "test", "ground_truth"}, "mvtec3d": {"train", "validation", "test"}}


def detect_layout(root: str | os.PathLike) -> str:
    """Guess the layout of ``root`` from marker files/folders (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetRootError(f"dataset root does not exist or is not a folder: {root}; set data.root (UAD_DATA_ROOT) "
                               f"to the dataset's folder")
    if (root / "split_csv").is_dir():
        return "visa"
    if (root / "realiad_jsons").is_dir():
        return "realiad"
    subs = _subdirs(root)
    if any((d / "test_public").is_dir() for d in subs):
        return "mvtec_ad2"
    if any((d / "train" / "good" / "rgb").is_dir() for d in subs):
        return "mvtec3d"
    if any((d / "train" / "ok").is_dir() for d in subs):
        return "btad"
    if any((d / "train" / "good").is_dir() for d in subs):
        return "mvtec"
    if _images_in(root):
        return "folder"
    if (root / "train" / "good").is_dir():
        raise DatasetLayoutError(f"{root} is one class folder (train/good inside): point data.root at the folder "
                                 f"that holds it ({root.parent}) and, for this class only, set data.classes=[{root.name}]")
    raise DatasetLayoutError(
        f"unknown layout at {root}: expected one of split_csv/ (visa), realiad_jsons/ (realiad), "
        f"<class>/test_public/ (mvtec_ad2), <class>/train/good/rgb/ (mvtec3d), <class>/train/ok/ (btad), <class>/train/good/ (mvtec, mpdd), "
        f"or image files directly inside (folder: one class of normal images); arrange the images so, or set data.layout"
    )


def scan_dataset(
    root: str | os.PathLike,
    layout: str = "auto",
    classes: Iterable[str] | None = None,
    dataset_name: str | None = None,
    **options,
) -> pd.DataFrame:
    """Scan ``root`` into a sample index (columns :data:`uad.data.index.INDEX_COLUMNS`).

    Args:
        root: dataset folder.
        layout: one of :data:`LAYOUTS` or ``"auto"``.
        classes: keep only these classes (error if one is not found).
        dataset_name: value of the ``dataset`` column; default: the name of ``root``.
        options: layout-specific: ``include_validation`` (mvtec3d), ``split_csv`` (visa),
            ``json_dir``, ``image_dir`` (realiad).

    The index is not validated here: call :func:`uad.data.index.validate_index`.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DatasetRootError(f"dataset root does not exist: {root}; set data.root (UAD_DATA_ROOT) to the dataset's folder")
    if not root.is_dir():
        raise DatasetRootError(f"dataset root is not a folder: {root}; set data.root (UAD_DATA_ROOT) to the folder "
                               f"that holds the images")
    root = root.absolute()
    lay = str(layout).lower()
    if lay == "auto":
        lay = detect_layout(root)
    if lay not in _ADAPTERS:
        raise DatasetLayoutError(f"unknown layout {layout!r}; set data.layout to one of {list(LAYOUTS) + ['auto']}")
    from uad.params import cli_list  # one class, a list, or the command line's fabric+pcb

    wanted = None if classes is None else [str(c) for c in cli_list(classes)]
    name = dataset_name if dataset_name is not None else root.name
    rows = _ADAPTERS[lay](root, name, classes=wanted, **options)
    df = pd.DataFrame(rows, columns=INDEX_COLUMNS) if rows else empty_index()
    if lay in _FOLDER_LAYOUTS:  # a class folder with no images is skipped, but never silently
        seen = set(df["class_name"])
        for d in _subdirs(root):
            if d.name not in seen and not d.name.startswith(".") and (wanted is None or d.name in wanted):
                log.warning("class folder %s holds no images in the %s layout (expected %s); it is skipped",
                            d, lay, _FOLDER_LAYOUTS[lay])
            if wanted is None or d.name in wanted:
                extra = [e.name for e in _subdirs(d) if e.name not in _CLASS_SUBFOLDERS[lay]]
                if extra:
                    log.warning("%s: sub-folder(s) %s are not part of the %s layout (it reads %s) and are not read%s",
                                d, ", ".join(extra), lay, ", ".join(sorted(_CLASS_SUBFOLDERS[lay])),
                                "; this looks like MVTec AD 2: set data.layout: mvtec_ad2 (or auto)"
                                if "test_public" in extra else "")
    if wanted is not None:
        found = set(df["class_name"])
        unknown = [c for c in wanted if c not in found]
        if unknown:
            raise DatasetLayoutError(f"classes {unknown} not found in {root} ({lay} layout); set data.classes to some of: "
                                     f"{sorted(found)}")
        df = df[df["class_name"].isin(wanted)]
    if len(df) == 0:
        raise DatasetLayoutError(f"no images found in {root} with the {lay} layout; check data.root and data.layout "
                                 f"(auto detects the layouts listed in the README)")
    df = df.sort_values(["class_name", "split", "label", "defect_type", "image_path"], kind="mergesort")
    df = df.reset_index(drop=True)
    df["label"] = df["label"].astype("int64")
    return df[INDEX_COLUMNS]
