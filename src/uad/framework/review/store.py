"""The images on screen and the reviewed dataset they are marked into.

Every image added (an upload, or a file of a named folder) becomes one :class:`Item` with its own
id: two uploads named ``part.png``, or ``x.png`` beside ``x.jpg``, are two items, two maps, two
marks. Uploads are kept in the session's work folder under their id; maps are kept there as
``.npy`` (float16, read back without pickle).

:class:`ReviewedDataset` writes marks into a folder in the MVTec layout the project ingests:

* ``<root>/<class>/train/good/<name>`` — images confirmed normal (one in five goes to
  ``test/good`` instead, so the retrained model's false alarms can be measured);
* ``<root>/<class>/test/<kind>/<name>`` and ``<root>/<class>/ground_truth/<kind>/<stem>_mask.png``
  — images marked defective (the mask is the model's region above the pixel threshold, or its
  top 1 % of pixels where the model saw none: a proposal to correct, recorded as such);
* ``<root>/review_marks.csv`` — every mark, in order (rewritten atomically).

Files are placed with a hard link from a finished temporary file, which fails rather than replace
an existing name, so nothing is ever overwritten: a taken name gets ``-2``, ``-3``, ...
Re-marking an image removes the copy its earlier mark wrote in this session (recorded in the CSV).
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import os
import re
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from uad.errors import ConfigError
from uad.osutil import atomic_write_bytes

__all__ = ["Item", "Items", "ReviewedDataset", "safe_name", "MARK_COLUMNS"]

MARK_COLUMNS = ["time", "item", "source", "mark", "defect_kind", "class_name", "written", "mask", "mask_source",
                "score", "image_threshold", "decision_at_threshold", "model", "replaces"]
#: the share of confirmed normals written to ``test/good`` instead of ``train/good``
HELD_OUT_NORMALS = 0.2
_NAME_OK = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(name: str, default: str = "image") -> str:
    """A file name (no folders, no leading dots, only ``A-Za-z0-9._-``) from a user-given one."""
    base = re.split(r"[\\/]", str(name or ""))[-1]
    base = _NAME_OK.sub("_", base).lstrip(".")[:120]
    return base or default


@dataclass
class Item:
    """One image on screen."""

    id: str
    name: str  #: what the page shows: the upload's name or the path relative to the named folder
    path: str  #: the image file the server reads
    origin: str  #: ``upload`` or the folder it came from
    status: str = "ok"
    error: str = ""
    score: float | None = None
    decision: str = ""
    anomalous_area: float | None = None  #: share of pixels at or above the pixel threshold
    map_max: float | None = None  #: the map's hottest pixel (beside the pixel threshold: why the area is 0)
    height: int = 0
    width: int = 0
    seconds: float = 0.0  #: from the request's arrival to the map, as measured by the server
    map_file: str = ""
    mark: str = ""  #: "", "normal" or "defect"
    defect_kind: str = ""
    written: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "origin": self.origin, "status": self.status, "error": self.error,
                "score": self.score, "decision": self.decision, "anomalous_area": self.anomalous_area,
                "map_max": self.map_max, "height": self.height, "width": self.width, "seconds": round(self.seconds, 3), "mark": self.mark,
                "defect_kind": self.defect_kind, "written": list(self.written)}


class Items:
    """The items of one server session, with their work folder (removed at shutdown)."""

    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="uad-review-")
        self.work = Path(self._tmp.name)
        (self.work / "uploads").mkdir()
        (self.work / "maps").mkdir()
        self._items: dict[str, Item] = {}
        self._lock = threading.Lock()
        self._n = 0

    def new_id(self) -> str:
        with self._lock:
            self._n += 1
            return f"i{self._n:05d}"

    def upload_path(self, item_id: str, name: str) -> Path:
        folder = self.work / "uploads" / item_id
        folder.mkdir()
        return folder / safe_name(name)

    def add(self, item: Item) -> Item:
        with self._lock:
            self._items[item.id] = item
        return item

    def get(self, item_id: str) -> Item:
        item = self._items.get(str(item_id))
        if item is None:
            raise ConfigError(f"no image {item_id!r} on this page (the server was restarted?): add it again")
        return item

    def remove(self, item_id: str) -> None:
        with self._lock:
            self._items.pop(str(item_id), None)

    def all(self) -> list[Item]:
        return list(self._items.values())

    def save_map(self, item: Item, amap: np.ndarray) -> None:
        path = self.work / "maps" / f"{item.id}.npy"
        np.save(path, amap.astype(np.float16), allow_pickle=False)
        item.map_file = str(path)

    def load_map(self, item: Item) -> np.ndarray:
        if not item.map_file:
            raise ConfigError(f"{item.name} has no map ({item.error or 'it was not scored'})")
        return np.load(item.map_file, allow_pickle=False).astype(np.float32)

    def close(self) -> None:
        self._tmp.cleanup()


def _place(src_bytes: bytes, folder: Path, name: str) -> Path:
    """``src_bytes`` as a new file in ``folder`` named ``name`` or, when taken, ``<stem>-2<ext>``,
    ``-3``, ...: written to a temporary file, synced, then hard-linked to the free name (the link
    fails instead of replacing a file another writer placed meanwhile)."""
    folder.mkdir(parents=True, exist_ok=True)
    stem, ext = os.path.splitext(name)
    fd, tmp = tempfile.mkstemp(prefix=".review-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(src_bytes)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        for k in range(1, 100000):
            target = folder / (name if k == 1 else f"{stem}-{k}{ext}")
            try:
                os.link(tmp, target)
                return target
            except FileExistsError:
                continue
        raise ConfigError(f"{folder} holds too many files named {name}: move some away")
    finally:
        Path(tmp).unlink(missing_ok=True)


class ReviewedDataset:
    """The folder the marks are written into (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.csv = self.root / "review_marks.csv"
        self._lock = threading.Lock()

    def mark(self, item: Item, mark: str, class_name: str, defect_kind: str, amap: np.ndarray | None,
             pixel_threshold: float | None, image_threshold: float | None, model: str) -> dict[str, Any]:
        if mark not in ("normal", "defect"):
            raise ConfigError(f"mark {mark!r} is not 'normal' or 'defect'")
        cls = safe_name(class_name, "")
        if not cls:
            raise ConfigError("give the class of the image (a name of letters, digits, '-', '_' or '.')")
        kind = ""
        if mark == "defect":
            kind = safe_name(defect_kind, "")
            if not kind or kind == "good":
                raise ConfigError("give the defect kind (a name such as scratch; 'good' is the normal folder)")
        try:
            data = Path(item.path).read_bytes()
        except OSError as e:
            raise ConfigError(f"{item.name} can no longer be read ({e.strerror}): add it again") from None
        name = safe_name(Path(item.name).name)
        with self._lock:
            removed = self._unmark(item)
            mask_path, mask_source = "", ""
            if mark == "normal":
                written = _place(data, self.root / cls / self._normal_split(cls) / "good", name)
            else:
                written = _place(data, self.root / cls / "test" / kind, name)
                mask, mask_source = _proposed_mask(amap, pixel_threshold, item)
                mpath = _place(mask, self.root / cls / "ground_truth" / kind, f"{written.stem}_mask.png")
                mask_path = str(mpath)
            item.mark, item.defect_kind = mark, kind
            item.written = [str(written)] + ([mask_path] if mask_path else [])
            decision = "" if item.score is None or image_threshold is None else (
                "anomalous" if item.score >= image_threshold else "normal")
            row = {"time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "item": item.id,
                   "source": item.name if item.origin == "upload" else item.path, "mark": mark, "defect_kind": kind,
                   "class_name": cls, "written": str(written), "mask": mask_path, "mask_source": mask_source,
                   "score": "" if item.score is None else f"{item.score:.6g}",
                   "image_threshold": "" if image_threshold is None else f"{image_threshold:.6g}",
                   "decision_at_threshold": decision, "model": model, "replaces": ";".join(removed)}
            self._append(row)
        return {"written": item.written, "mask_source": mask_source, "csv": str(self.csv), "replaced": removed}

    def _normal_split(self, cls: str) -> str:
        """``train`` for most confirmed normals, ``test`` for about one in five (the third, the
        eighth, ...): a retraining on this folder then has normal test images to measure its
        false alarms on, beside the defects (ingest holds normals out only for a class with no
        test images at all)."""
        n_train, n_test = (sum(1 for p in (self.root / cls / s / "good").glob("*") if not p.name.startswith("."))
                           if (self.root / cls / s / "good").is_dir() else 0 for s in ("train", "test"))
        return "test" if n_train >= 1 and n_test < round(HELD_OUT_NORMALS * (n_train + n_test + 1)) else "train"

    def _unmark(self, item: Item) -> list[str]:
        """Removes what this item's earlier mark wrote (a changed mind must not leave the image in
        the other folder)."""
        removed = []
        for p in item.written:
            try:
                Path(p).unlink()
                removed.append(p)
            except FileNotFoundError:
                pass
        item.written = []
        return removed

    def _append(self, row: dict[str, Any]) -> None:
        rows: list[dict[str, Any]] = []
        if self.csv.is_file():
            with self.csv.open(newline="") as fh:
                rows = list(csv.DictReader(fh))
        rows.append(row)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=MARK_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(self.csv, buf.getvalue().encode())

    def counts(self) -> dict[str, int]:
        out = {"normal": 0, "defect": 0}
        if self.root.is_dir():
            out["normal"] = sum(1 for _ in self.root.glob("*/train/good/*") if not _.name.startswith("."))
            out["defect"] = sum(1 for p in self.root.glob("*/test/*/*") if p.parent.name != "good"
                                and not p.name.startswith("."))
        return out


def _proposed_mask(amap: np.ndarray | None, pixel_threshold: float | None, item: Item) -> tuple[bytes, str]:
    """The mask PNG (0 / 255, the image's size) proposed for a defect: the map at or above the
    pixel threshold, or its top 1 % where no pixel reaches it."""
    from PIL import Image

    if amap is None:
        raise ConfigError(f"{item.name} has no map, so no mask can be proposed: mark it normal or add it again")
    m = np.nan_to_num(np.asarray(amap, np.float32), nan=-np.inf)
    hot = m >= float(pixel_threshold) if pixel_threshold is not None else np.zeros(m.shape, bool)
    source = "model map >= pixel threshold"
    if not hot.any():
        finite = m[np.isfinite(m)]
        cut = float(np.quantile(finite, 0.99)) if finite.size else np.inf
        hot = m >= cut
        source = "model map, top 1 % (no pixel above the pixel threshold)"
    buf = io.BytesIO()
    Image.fromarray((hot * 255).astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue(), source
