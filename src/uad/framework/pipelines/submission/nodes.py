"""The submission node: thin, over :mod:`uad.submission` and :class:`uad.inference.Inferencer`."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from uad.errors import ConfigError

log = logging.getLogger(__name__)


def _class_thresholds(thresholds: dict, classes: list[str], frame: str) -> tuple[dict[str, float], str]:
    """Each class's pixel threshold: the per-class one fixed on its validation normals (the frame
    infer scores in first), else the run's one pixel threshold."""
    sources = [thresholds.get("full") or {}, thresholds] if frame == "full" else [thresholds]
    for thr in sources:
        per = thr.get("per_class_pixel") or {}
        if all(c in per for c in classes):
            return {c: float(per[c]) for c in classes}, str(thr.get("per_class_pixel_source", "per class"))
    for thr in sources:
        if thr.get("pixel") is not None:
            return {c: float(thr["pixel"]) for c in classes}, str(thr.get("pixel_source", "pixel"))
    raise ConfigError("no pixel threshold stored for this method: run its evaluation first (kedro run "
                      "--pipeline=<method> with an MVTec AD 2 folder, whose validation normals fix them)")


def write_submission(method_name: str, namespace: str, images: pd.DataFrame, method_params: dict, engine: dict,
                     engine_override: dict, checkpoint: dict, thresholds: dict, infer: dict,
                     submission: dict | None) -> dict[str, str]:
    """Score every ``test_private`` / ``test_private_mixed`` image (full frame: maps at each
    image's own size), write the continuous and thresholded maps, check the folder as the dataset's
    checker does, pack it, and log one last line naming what to upload."""
    from uad.data.mvtec_ad2 import PRIVATE_FILE_COUNTS
    from uad.engine.orchestration import engine_config
    from uad.inference import Inferencer, frame_options, holds_per_class_models, load_trained
    from uad.submission import SPLITS, check_submission, pack_submission, write_map_pair

    submission = submission or {}
    rows = images[images["split"].isin(SPLITS)] if len(images) else images
    if len(rows) == 0:
        raise ConfigError("unlabelled_index has no test_private / test_private_mixed image: point UAD_DATA_ROOT at an "
                          "MVTec AD 2 folder (data.layout: mvtec_ad2 or auto) and run the method's pipeline first")
    folder = Path(submission.get("folder") or f"data/07_model_output/{namespace}/submission")
    cfg = engine_config(engine, engine_override)
    meta = checkpoint.get("meta") or {}
    classes = sorted(str(c) for c in rows["class_name"].unique())
    opts = frame_options(infer, int(cfg.infer_batch_size or cfg.batch_size or 8))
    per_class_thr, source = _class_thresholds(thresholds, classes, opts.get("frame", "full"))
    work = folder.with_name(f".{folder.name}.{os.getpid()}.part")
    shutil.rmtree(work, ignore_errors=True)
    chunk = int(submission.get("chunk", 16))
    per_class = holds_per_class_models(meta)
    inf = None
    try:
        for cls in classes:
            if inf is None or per_class:
                method = load_trained(method_name, method_params, checkpoint["tensors"], meta, checkpoint.get("path"),
                                      cls if per_class else None, "submission")
                inf = Inferencer(method, None, class_name=cls if per_class else None, classes=meta.get("classes") or (),
                                 engine=cfg, progress=bool(cfg.progress), workers=max(1, int(cfg.num_workers or 1)),
                                 **opts)
            for split in SPLITS:
                part = rows[(rows["class_name"] == cls) & (rows["split"] == split)]
                paths = list(part["image_path"])
                for s in range(0, len(paths), chunk):
                    batch = paths[s:s + chunk]
                    res = inf.predict(batch, strict=True, class_names=[cls] * len(batch) if inf.wants_class else None)
                    for p, r in zip(batch, res):
                        write_map_pair(work, cls, split, p, r.map, per_class_thr[cls])
            log.info("submission: %s scored (%s), pixel threshold %.6g (%s)", cls, ", ".join(
                f"{sp} {int(((rows['class_name'] == cls) & (rows['split'] == sp)).sum())}" for sp in SPLITS),
                per_class_thr[cls], source)
        official = PRIVATE_FILE_COUNTS if set(classes) == set(PRIVATE_FILE_COUNTS) else None
        summary = check_submission(work, rows.to_dict("records"), official_counts=official)
        if folder.exists():
            shutil.rmtree(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        os.replace(work, folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    archive = pack_submission(folder)
    checks = "the dataset checker's counts" if official else "the source images' counts (not the 8 official objects)"
    log.info("submission: %d files pass the checks (names, %s, float16 / {0, 255}, sizes)", summary["files"], checks)
    log.info("submission ready: upload %s (folder %s)", archive.resolve(), folder.resolve())
    return {"submission_folder": str(folder.resolve()), "submission_archive": str(archive.resolve()),
            "submission_files": str(summary["files"]), "submission_threshold_source": source,
            "submission_official_counts": str(official is not None), "method": method_name}
