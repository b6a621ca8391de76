"""Score a folder of images with an :class:`~uad.inference.Inferencer`: the results table, the maps
at each image's own size, and the overlay pictures (all of them, the ``max_overlays`` most
anomalous, or none for 0; one file per image, whatever the names in the folder), in chunks so decoded images and full-size maps never pile up. What ``kedro run
--pipeline=infer`` writes; callable from a notebook or a script. Core library: no kedro, no mlflow."""

from __future__ import annotations

import heapq
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["score_folder", "overlay_name", "overlay_names", "RESULT_COLUMNS"]

RESULT_COLUMNS = ["image_path", "relative_path", "status", "error", "score", "decision", "anomalous_area", "height",
                  "width", "frame", "pieces", "overlay"]


def overlay_name(relative_path: str) -> str:
    """A file name unique per input path: the relative path with its folders joined by ``__``
    and its extension kept (``line1/a.png`` and ``line1/a.jpg`` do not collide)."""
    stem, dot, ext = relative_path.rpartition(".")
    base = (stem if dot else relative_path).replace("/", "__").replace("\\", "__")
    return f"{base}{'_' + ext.lower() if dot else ''}.png"


def overlay_names(relative_paths: list[str]) -> list[str]:
    """One overlay file name per input path, never two alike: :func:`overlay_name`, and where two
    paths give the same name (``sub/y.png`` beside ``sub__y.png``; ``X.png`` beside ``x.png`` on a
    file system that ignores case) the later ones get ``-2``, ``-3``, ... in the paths' order."""
    taken: set[str] = set()
    out = []
    for rel in relative_paths:
        name = overlay_name(rel)
        stem = name[:-4]
        k = 1
        while name.lower() in taken:
            k += 1
            name = f"{stem}-{k}.png"
        taken.add(name.lower())
        out.append(name)
    return out


def score_folder(inf: Any, rows: pd.DataFrame, method_name: str, limit: int | None = None,
                 overlay_side: int | None = 1024) -> tuple[pd.DataFrame, dict[str, np.ndarray], dict[str, bytes]]:
    """``rows``: a folder index (:func:`uad.data.folder.scan_image_folder`: ``image_path``,
    ``relative_path``, ``mask_path``). Returns the results table (one row per file, unreadable ones
    with their error), ``{"map_<i>": float16 map, "mask_<i>": uint8 mask}`` and ``{name: overlay PNG}``."""
    from uad.data.images import load_mask
    from uad.metrics.plots import image_overlay_png

    rows = rows.reset_index(drop=True)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"max_overlays: {limit!r} is not a non-negative integer (0: no overlays; None: one per image)")
    names = overlay_names(list(rows["relative_path"]))
    thr = inf.thresholds
    kept: list[tuple[float, int, bytes | None]] = []
    pngs: dict[str, bytes] = {}
    table, maps_out, masks_out = [], {}, {}
    chunk = max(inf.batch_size * 4, 16)
    for start in range(0, len(rows), chunk):  # chunks: decoded images and full-size maps never pile up
        part = rows.iloc[start:start + chunk]
        for i, res in zip(part.index, inf.predict(list(part["image_path"]), keep_images=True)):
            rel = rows.at[i, "relative_path"]
            name = names[i]
            row = {"image_path": rows.at[i, "image_path"], "relative_path": rel, **res.as_row(), "overlay": ""}
            row.pop("source")
            if res.status == "ok":
                maps_out[f"map_{i:05d}"] = res.map.astype(np.float16)
                if rows.at[i, "mask_path"]:
                    masks_out[f"mask_{i:05d}"] = load_mask(rows.at[i, "mask_path"]).astype(np.uint8)
                verdict = res.decision.upper() if res.decision == "anomalous" else res.decision
                text = f"{verdict}  score {res.score:.4g} (threshold {thr['image']:.4g})  {method_name}  {rel}"
                png = lambda res=res, text=text: image_overlay_png(res.image, res.map, thr["pixel"], text,  # noqa: E731
                                                                   res.decision == "anomalous", overlay_side)
                if limit is None:
                    pngs[name] = png()
                    row["overlay"] = name
                elif limit == 0:
                    pass  # no overlays asked for: none drawn
                elif len(kept) < limit or res.score > kept[0][0]:
                    item = (res.score, int(i), png())
                    (heapq.heappush if len(kept) < limit else heapq.heapreplace)(kept, item)
            table.append(row)
            res.image = res.map = None
    if limit is not None:
        ranked = sorted(kept, key=lambda t: -t[0])
        for rank, (_, i, png) in enumerate(ranked):
            name = f"{rank:05d}_{names[i]}"
            pngs[name] = png
            table[i]["overlay"] = name
    results = pd.DataFrame(table, columns=RESULT_COLUMNS)
    results["image_threshold"] = thr["image"]
    results["threshold_source"] = thr["image_source"]
    results["threshold_frame"] = inf.threshold_frame
    results["pixel_threshold"] = thr["pixel"] if thr["pixel"] is not None else np.nan
    return results, {**maps_out, **masks_out}, pngs
