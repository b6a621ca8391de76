"""Use a trained model: score a folder of new images (``infer``) and export it to ONNX (``export``).

Thin Kedro nodes over the core library, shared by every method through the namespaced template:
the method is rebuilt from its parameters, its checkpoint (the latest catalog version unless
``--load-versions`` names one) is checked and loaded, and the images go through the same dataset
and loader as evaluation, so a score here equals the evaluate run's score for the same image.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from uad.data.folder import scan_image_folder
from uad.data.torch_data import SkipUnreadable, denormalize
from uad.engine import Trainer
from uad.errors import ConfigError
from uad.methods.registry import build_method

from .nodes import _dataset, _engine_cfg, _split_state, per_class_models, score_dataset

log = logging.getLogger(__name__)


def _checkpoint_version(checkpoint: dict) -> str:
    path = checkpoint.get("path") or ""
    return Path(path).parent.name if path else ""


def _load_method(method_name: str, method_params: dict, checkpoint: dict, class_name: str | None, what: str):
    """The method with the checkpoint's weights; a one-class checkpoint needs the class to use."""
    meta = checkpoint.get("meta") or {}
    method = build_method(method_name, method_params)
    method.check_checkpoint(meta, checkpoint.get("path"))
    group = None
    if per_class_models(meta):
        classes = list(meta.get("classes") or [])
        if not class_name:
            raise ConfigError(f"{checkpoint.get('path')} holds one model per class ({', '.join(classes)}): "
                              f"set {what}.class_name to the class of these images")
        if class_name not in classes:
            raise ConfigError(f"{what}.class_name {class_name!r} is not a class of {checkpoint.get('path')} ({', '.join(classes)})")
        group = class_name
    method.load_state_dict(_split_state(checkpoint["tensors"], group))
    return method


def _thresholds(stored: dict, infer: dict, method_name: str) -> dict[str, Any]:
    """The stored thresholds, each overridable; a clear error when there is none to use."""
    out = {"image": stored.get("image"), "image_source": stored.get("image_source", "none"),
           "pixel": stored.get("pixel"), "pixel_source": stored.get("pixel_source", "none")}
    for key in ("image", "pixel"):
        if infer.get(f"{key}_threshold") is not None:
            out[key], out[f"{key}_source"] = float(infer[f"{key}_threshold"]), "user"
    if out["image"] is None:
        raise ConfigError(f"no image threshold for {method_name}: run its evaluation first "
                          f"(kedro run --pipeline={method_name} stores one) or set infer.image_threshold")
    return out


def scan_images(infer: dict) -> pd.DataFrame:
    """The folder ``infer.images`` as an index (listing only: each file is decoded once, when
    scored)."""
    if not infer.get("images"):
        raise ConfigError("set infer.images to the folder of images to score "
                          "(--params=\"infer.images=/path\" or UAD_INFER_IMAGES=/path)")
    df = scan_image_folder(infer["images"], infer.get("masks"))
    log.info("infer: %d image file(s) under %s", len(df), infer["images"])
    return df


class _Overlays:
    """Decision pictures made while scoring, from the decoded batch (no second decode). With a
    cap, only the ``limit`` most anomalous are kept (a bounded heap) and named by rank; without
    one, every image's picture, named after its path."""

    def __init__(self, limit: int | None, thr: dict, spec: dict, rows: pd.DataFrame):
        self.limit, self.thr, self.rows = limit, thr, rows
        self.mean, self.std = spec["mean"], spec["std"]
        self.kept: list[tuple[float, int, np.ndarray, np.ndarray]] = []  # heap of (score, index, image, map)
        self.pngs: dict[str, bytes] = {}
        self.px: float | None = thr["pixel"]

    def _image(self, x: torch.Tensor) -> np.ndarray:
        return denormalize(x, self.mean, self.std)[0]  # the decoded uint8 image, exactly

    def _png(self, score: float, i: int, img: np.ndarray, amap: np.ndarray) -> bytes:
        from uad.metrics.plots import decision_overlay_png

        verdict = "ANOMALOUS" if score >= self.thr["image"] else "normal"
        text = f"{verdict}  score {score:.4g} (threshold {self.thr['image']:.4g})  {self.rows.iloc[i]['relative_path']}"
        px = self.px if self.px is not None else float(np.quantile(amap, 0.99))
        return decision_overlay_png(img, amap, px, text, verdict != "normal")

    def _stem(self, i: int) -> str:
        return self.rows.iloc[i]["relative_path"].rsplit(".", 1)[0].replace("/", "__")

    def add(self, batch: dict, out) -> None:
        import heapq

        errors = batch.get("error") or [""] * len(batch["image"])
        for j, err in enumerate(errors):
            if err:
                continue
            i, score = int(batch["index"][j]), float(out.scores[j])
            amap = out.maps[j].float().cpu().numpy()
            if self.limit is None:
                self.pngs[f"{self._stem(i)}.png"] = self._png(score, i, self._image(batch["image"][j]), amap)
            elif len(self.kept) < self.limit:
                heapq.heappush(self.kept, (score, i, self._image(batch["image"][j]), amap))
            elif score > self.kept[0][0]:
                heapq.heapreplace(self.kept, (score, i, self._image(batch["image"][j]), amap))

    def result(self) -> dict[str, bytes]:
        if self.limit is None:
            return self.pngs
        ranked = sorted(self.kept, key=lambda t: -t[0])  # the most anomalous first
        return {f"{rank:05d}_{self._stem(i)}.png": self._png(score, i, img, amap)
                for rank, (score, i, img, amap) in enumerate(ranked)}


@torch.no_grad()
def infer_images(method_name: str, images: pd.DataFrame, method_params: dict, engine: dict, engine_override: dict,
                 checkpoint: dict, thresholds: dict, infer: dict
                 ) -> tuple[pd.DataFrame, dict[str, np.ndarray], dict[str, bytes], dict[str, str]]:
    """Scores, decisions, maps and overlay pictures of every readable image, plus run tags linking
    this run to the training run and the checkpoint version it used. An image or mask that cannot
    be decoded is listed (status ``unreadable`` with the reason) and skipped."""
    cfg = _engine_cfg(engine, engine_override)
    thr = _thresholds(thresholds or {}, infer, method_name)
    method = _load_method(method_name, method_params, checkpoint, infer.get("class_name"), "infer")
    trainer = Trainer(cfg)
    trainer.prepare(method)
    method.eval_mode()
    rows = images.reset_index(drop=True)
    limit = infer.get("max_overlays")
    overlays = _Overlays(None if limit is None else int(limit), thr, method.input_spec, rows)
    errors: list[str] = []
    ds = SkipUnreadable(_dataset(method, rows, sorted(rows["class_name"].unique())))
    scores, maps, masks = score_dataset(method, ds, trainer, cfg, f"{method_name}:infer", errors=errors,
                                        on_batch=overlays.add)
    good = np.array([not e for e in errors], dtype=bool)
    results = rows[["image_path", "relative_path"]].copy()
    results["status"] = np.where(good, "ok", "unreadable")
    results["error"] = errors
    results["score"] = np.where(good, scores, np.nan)
    results["decision"] = np.where(good, np.where(scores >= thr["image"], "anomalous", "normal"), "")
    if thr["pixel"] is not None:
        area = (maps.astype(np.float32) >= thr["pixel"]).reshape(len(rows), -1).mean(1)
        results["anomalous_area"] = np.where(good, area, np.nan)
    results["image_threshold"] = thr["image"]
    results["threshold_source"] = thr["image_source"]
    results["pixel_threshold"] = thr["pixel"] if thr["pixel"] is not None else np.nan
    version = _checkpoint_version(checkpoint)
    results["checkpoint"] = version
    bad = results[~good]
    if len(bad):
        log.warning("infer: %d of %d file(s) cannot be read and were skipped:\n%s", len(bad), len(results),
                    "\n".join(f"  {r.image_path}: {r.error}" for r in bad.itertuples()))
    ok = rows[good]
    maps, masks = maps[good], masks[good]
    n_bad = int((results["status"] != "ok").sum())
    n_anom = int((results["decision"] == "anomalous").sum())
    log.info("infer: %d anomalous of %d scored (image threshold %.6g, %s); %d unreadable skipped",
             n_anom, len(ok), thr["image"], thr["image_source"], n_bad)
    meta = checkpoint.get("meta") or {}
    tags = {"trained_in_run": meta.get("mlflow_run_id", "unknown"), "checkpoint_version": version,
            "checkpoint_path": checkpoint.get("path", ""), "method": method_name,
            "infer_images": str(infer.get("images")), "image_threshold": f"{thr['image']:.6g}",
            "threshold_source": thr["image_source"], "n_scored": str(len(ok)), "n_anomalous": str(n_anom),
            "n_unreadable": str(n_bad)}
    arrays = {"maps": maps, "scores": scores[good].astype(np.float32), "image_paths": ok["image_path"].to_numpy(str)}
    if len(ok) and (ok["mask_path"] != "").any():  # ground truth given with the images: kept beside the maps
        arrays["masks"] = masks
        arrays["has_mask"] = (ok["mask_path"] != "").to_numpy(bool)
    return results, arrays, overlays.result(), tags


def export_model(method_name: str, method_params: dict, checkpoint: dict, thresholds: dict, export: dict
                 ) -> tuple[bytes, dict[str, Any], dict[str, str]]:
    """The ONNX model of the whole inference path (preprocessed image in; map and score out) and
    the JSON a runtime needs beside it: preprocessing, thresholds, provenance."""
    from uad.export import export_onnx, preprocessing_spec

    method = _load_method(method_name, method_params, checkpoint, export.get("class_name"), "export")
    data, info = export_onnx(method, batch=int(export.get("batch", 2)), opset=int(export.get("opset", 18)),
                             dynamic_batch=bool(export.get("dynamic_batch", True)))
    meta = checkpoint.get("meta") or {}
    spec = {"method": method_name, "checkpoint_version": _checkpoint_version(checkpoint),
            "trained_in_run": meta.get("mlflow_run_id", "unknown"), "identity": method.identity(),
            "preprocessing": preprocessing_spec(method), "export": info,
            "thresholds": {k: v for k, v in (thresholds or {}).items()}}
    log.info("export: %s ONNX model, %.1f MB, batch %s, opset %d", method_name, len(data) / 2**20, info["batch"],
             info["opset"])
    tags = {"trained_in_run": spec["trained_in_run"], "checkpoint_version": spec["checkpoint_version"],
            "onnx_batch": str(info["batch"]), "onnx_opset": str(info["opset"]), "method": method_name}
    return data, spec, tags
