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
from uad.engine import Trainer
from uad.errors import ConfigError
from uad.methods.registry import build_method

from .nodes import ONE_CLASS, _display_image, _engine_cfg, _split_state, _dataset, score_dataset

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
    if meta.get("setting") == ONE_CLASS:
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


def scan_images(infer: dict, engine: dict) -> pd.DataFrame:
    """The folder ``infer.images`` as an index; unreadable files are kept as rows with their error
    (reported, never scored)."""
    if not infer.get("images"):
        raise ConfigError("set infer.images to the folder of images to score "
                          "(--params=\"infer.images=/path\" or UAD_INFER_IMAGES=/path)")
    df = scan_image_folder(infer["images"], infer.get("masks"), progress=bool((engine or {}).get("progress", True)))
    bad = df[df["status"] != "ok"]
    if len(bad):
        log.warning("infer: %d of %d file(s) cannot be read and are skipped:\n%s", len(bad), len(df),
                    "\n".join(f"  {r.image_path}: {r.error}" for r in bad.itertuples()))
    log.info("infer: %d image(s) to score under %s", int((df["status"] == "ok").sum()), infer["images"])
    return df


@torch.no_grad()
def infer_images(method_name: str, images: pd.DataFrame, method_params: dict, engine: dict, engine_override: dict,
                 checkpoint: dict, thresholds: dict, infer: dict
                 ) -> tuple[pd.DataFrame, dict[str, np.ndarray], dict[str, bytes], dict[str, str]]:
    """Scores, decisions, maps and overlay pictures of every readable image, plus run tags linking
    this run to the training run and the checkpoint version it used."""
    from uad.metrics.plots import decision_overlay_png

    cfg = _engine_cfg(engine, engine_override)
    thr = _thresholds(thresholds or {}, infer, method_name)
    method = _load_method(method_name, method_params, checkpoint, infer.get("class_name"), "infer")
    trainer = Trainer(cfg)
    trainer.prepare(method)
    method.eval_mode()
    ok = images[images["status"] == "ok"].reset_index(drop=True)
    results = images[["image_path", "relative_path", "status", "error"]].copy()
    results["score"] = np.nan
    results["decision"] = ""
    maps = np.zeros((0,), np.float16)
    if len(ok):
        ds = _dataset(method, ok, sorted(ok["class_name"].unique()))
        scores, maps, masks = score_dataset(method, ds, trainer, cfg, f"{method_name}:infer")
        pos = results.index[results["status"] == "ok"]
        results.loc[pos, "score"] = scores
        results.loc[pos, "decision"] = np.where(scores >= thr["image"], "anomalous", "normal")
        if thr["pixel"] is not None:
            results.loc[pos, "anomalous_area"] = (maps.astype(np.float32) >= thr["pixel"]).reshape(len(ok), -1).mean(1)
    results["image_threshold"] = thr["image"]
    results["threshold_source"] = thr["image_source"]
    results["pixel_threshold"] = thr["pixel"] if thr["pixel"] is not None else np.nan
    version = _checkpoint_version(checkpoint)
    results["checkpoint"] = version
    overlays: dict[str, bytes] = {}
    limit = infer.get("max_overlays")
    if len(ok):
        order = np.argsort(-scores)  # the most anomalous first when the overlays are capped
        picks = order if limit is None else order[: int(limit)]
        spec = method.input_spec
        px = thr["pixel"] if thr["pixel"] is not None else float(np.quantile(maps.astype(np.float32), 0.99))
        for rank, i in enumerate(picks):
            row = ok.iloc[int(i)]
            verdict = "ANOMALOUS" if scores[i] >= thr["image"] else "normal"
            text = f"{verdict}  score {scores[i]:.4g} (threshold {thr['image']:.4g})  {row['relative_path']}"
            png = decision_overlay_png(_display_image(row["image_path"], spec["resize"], spec["crop"]),
                                       maps[i].astype(np.float32), px, text, verdict != "normal")
            stem = row["relative_path"].rsplit(".", 1)[0].replace("/", "__")
            overlays[f"{rank:05d}_{stem}.png"] = png
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
    arrays = {"maps": maps, "scores": results.loc[results["status"] == "ok", "score"].to_numpy(np.float32),
              "image_paths": ok["image_path"].to_numpy(str)}
    if len(ok) and (ok["mask_path"] != "").any():  # ground truth given with the images: kept beside the maps
        arrays["masks"] = masks
        arrays["has_mask"] = (ok["mask_path"] != "").to_numpy(bool)
    return results, arrays, overlays, tags


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
