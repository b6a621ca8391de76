"""Use a trained model: score a folder of new images (``infer``) and export it to ONNX (``export``).

Thin Kedro nodes over the core library, shared by every method through the namespaced template:
the method is rebuilt from its parameters, its checkpoint (the latest catalog version unless
``--load-versions`` names one) is checked and loaded, and the images are scored by
:class:`uad.inference.Inferencer`, the same class the notebooks and the MLflow model use: the
whole frame by default (every pixel; maps and overlays at each image's own size), or, with
``infer.frame: crop``, the evaluation's centre crop (a score then equals the evaluate run's).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from uad.data.folder import scan_image_folder
from uad.errors import ConfigError
from uad.inference import load_trained

from uad.engine.orchestration import checkpoint_params, engine_config

log = logging.getLogger(__name__)


def _checkpoint_version(checkpoint: dict) -> str:
    path = checkpoint.get("path") or ""
    return Path(path).parent.name if path else ""


def _load_method(method_name: str, method_params: dict, checkpoint: dict, class_name: str | None, what: str):
    """The method with the checkpoint's weights; a one-class checkpoint needs the class to use."""
    return load_trained(method_name, method_params, checkpoint["tensors"], checkpoint.get("meta") or {},
                        checkpoint.get("path"), class_name, what)


def _require_image_threshold(thr: dict, method_name: str) -> None:
    if thr.get("image") is None:
        raise ConfigError(f"no image threshold for {method_name}: run its evaluation first "
                          f"(kedro run --pipeline={method_name} stores one) or set infer.image_threshold")


def scan_images(infer: dict) -> pd.DataFrame:
    """The folder ``infer.images`` as an index (listing only: each file is decoded once, when
    scored)."""
    if not infer.get("images"):
        raise ConfigError("set infer.images to the folder of images to score "
                          "(--params=\"infer.images=/path\" or UAD_INFER_IMAGES=/path)")
    df = scan_image_folder(infer["images"], infer.get("masks"))
    log.info("infer: %d image file(s) under %s", len(df), infer["images"])
    return df


@torch.no_grad()
def infer_images(method_name: str, images: pd.DataFrame, method_params: dict, engine: dict, engine_override: dict,
                 checkpoint: dict, thresholds: dict, infer: dict
                 ) -> tuple[pd.DataFrame, dict[str, np.ndarray], dict[str, bytes], dict[str, str]]:
    """Scores, decisions, maps (at each image's own size) and overlay pictures of every readable
    image through :class:`uad.inference.Inferencer` (the library's one inference path), plus run
    tags linking this run to the training run and the checkpoint version it used. An image that
    cannot be decoded is listed (status ``error`` with the reason) and skipped."""
    from uad.folder_scoring import score_folder
    from uad.inference import Inferencer, frame_options

    cfg = engine_config(engine, engine_override)
    meta = checkpoint.get("meta") or {}
    method = _load_method(method_name, method_params, checkpoint, infer.get("class_name"), "infer")
    limit = infer.get("max_overlays")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ConfigError(f"infer.max_overlays: {limit!r} is not a non-negative integer; 0 writes no overlays, "
                          f"null one per image")
    for key in ("image_threshold", "pixel_threshold"):
        val = infer.get(key)
        if val is not None and (isinstance(val, bool) or not isinstance(val, (int, float))):
            raise ConfigError(f"infer.{key}: {val!r} is not a number (or null: the threshold the evaluation stored); "
                              f"e.g. --params=\"infer.{key}=0.35\"")
    overlay_side = infer.get("overlay_max_side", 1024)
    if overlay_side is not None and (isinstance(overlay_side, bool) or not isinstance(overlay_side, int) or overlay_side < 16):
        raise ConfigError(f"infer.overlay_max_side: {overlay_side!r} is not an integer >= 16 (or null: full size)")
    inf = Inferencer(method, thresholds or {}, class_name=infer.get("class_name"), classes=meta.get("classes") or (),
                     engine=cfg, progress=bool(cfg.progress), workers=max(1, int(cfg.num_workers or 1)),
                     image_threshold=infer.get("image_threshold"), pixel_threshold=infer.get("pixel_threshold"),
                     **frame_options(infer, int(cfg.infer_batch_size or cfg.batch_size or 8)))
    _require_image_threshold(inf.thresholds, method_name)
    results, maps_out, pngs = score_folder(inf, images, method_name, limit, overlay_side)
    thr = inf.thresholds
    version = _checkpoint_version(checkpoint)
    results["checkpoint"] = version
    good = (results["status"] == "ok").to_numpy()
    bad = results[~good]
    if len(bad):
        log.warning("infer: %d of %d file(s) could not be scored and were skipped:\n%s", len(bad), len(results),
                    "\n".join(f"  {r.image_path}: {r.error}" for r in bad.itertuples()))
    n_anom = int((results["decision"] == "anomalous").sum())
    log.info("infer: %d anomalous of %d scored (image threshold %.6g, %s; frame %s); %d skipped",
             n_anom, int(good.sum()), thr["image"], thr["image_source"], inf.frame, len(bad))
    tags = {"trained_in_run": meta.get("mlflow_run_id", "unknown"), "checkpoint_version": version,
            "checkpoint_path": checkpoint.get("path", ""), "method": method_name,
            "infer_images": str(infer.get("images")), "image_threshold": f"{thr['image']:.6g}",
            "threshold_source": thr["image_source"], "threshold_frame": inf.threshold_frame, "infer_frame": inf.frame, "n_scored": str(int(good.sum())),
            "n_anomalous": str(n_anom), "n_unreadable": str(len(bad)), **checkpoint_params(meta)}
    ok = results[good]
    arrays: dict[str, np.ndarray] = {"scores": ok["score"].to_numpy(np.float32), "image_paths": ok["image_path"].to_numpy(str),
                                      "map_keys": np.array([f"map_{i:05d}" for i in ok.index], dtype=str),
                                      "sizes": ok[["height", "width"]].to_numpy(np.int64),
                                      **maps_out}  # with the ground truth given with the images (mask_<i>), if any
    return results, arrays, pngs, tags


def export_model(method_name: str, method_params: dict, checkpoint: dict, thresholds: dict, export: dict,
                 metrics_table: pd.DataFrame | None = None, train_index: pd.DataFrame | None = None
                 ) -> tuple[bytes, dict[str, Any], dict[str, Any], dict[str, str], dict[str, bytes]]:
    """The ONNX model of the whole inference path (preprocessed image in; map and score out), the
    JSON a runtime needs beside it (preprocessing, thresholds, provenance), and the servable
    MLflow model (:mod:`uad.framework.mlflow_model`: the checkpoint, thresholds and frame settings, behind
    :class:`uad.inference.Inferencer`; images in, scores, decisions and maps out)."""
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
            "onnx_batch": str(info["batch"]), "onnx_opset": str(info["opset"]), "method": method_name,
            **checkpoint_params(meta)}
    served = served_model_payload(method_name, checkpoint, thresholds or {}, export, method, _mean_metrics(metrics_table))
    deploy = deploy_files(method_name, method, export, thresholds or {}, train_index, spec)
    if deploy:
        tags["deploy_formats"] = ",".join(json.loads(deploy["deploy.json"])["models"])
    return data, spec, served, tags, deploy


def deploy_files(method_name: str, method, export: dict, thresholds: dict, train_index: pd.DataFrame | None,
                 spec: dict[str, Any]) -> dict[str, bytes]:
    """The files of ``export.formats`` (:func:`uad.deploy.export.export_bundle`: uint8-input ONNX
    fp32 / INT8 and OpenVINO IR, ``deploy.json``, ``uad_runtime.py``); INT8 is calibrated on up to
    ``export.calibration_images`` training normals of the run's training index. Empty when no
    format is asked for."""
    formats = export.get("formats") or []
    if not formats:
        return {}
    from uad.deploy.export import SELFTEST_IMAGES, calibration_images, check_formats, export_bundle

    formats = check_formats(formats)
    for key, low in (("calibration_images", 1), ("int8_keep_first", 0)):
        val = export.get(key, 64 if key == "calibration_images" else 10)
        if isinstance(val, bool) or not isinstance(val, int) or val < low:
            raise ConfigError(f"export.{key}: {val!r} is not an integer >= {low}")
    rows = train_index if train_index is not None else pd.DataFrame(columns=["image_path", "label"])
    normals = list((rows[rows["label"].astype(int) == 0] if len(rows) else rows)["image_path"])
    spec_in = method.input_spec
    calib = reference = None
    if any(f.endswith("int8") for f in formats):
        calib = calibration_images(normals, int(spec_in["resize"]), int(spec_in["crop"]),
                                   limit=int(export.get("calibration_images", 64)))
        reference = calib[:SELFTEST_IMAGES]
    elif normals:  # the self-test's reference images (selftest.npz): training normals, also without INT8
        reference = calibration_images(normals, int(spec_in["resize"]), int(spec_in["crop"]), limit=SELFTEST_IMAGES)
    try:
        files, manifest = export_bundle(method, formats, calib, thresholds,
                                        extra={"checkpoint_version": spec["checkpoint_version"],
                                               "trained_in_run": spec["trained_in_run"]},
                                        int8_keep_first=int(export.get("int8_keep_first", 10)),
                                        reference_images=reference)
    except ImportError as e:
        raise ConfigError(f"export.formats: {', '.join(formats)} needs {e.name or e}: pip install -e \".[deploy]\"") from None
    log.info("export: %s deployable formats %s (%.1f MB)", method_name, ", ".join(manifest["models"]),
             sum(len(v) for v in files.values()) / 2**20)
    return files


def _mean_metrics(table: pd.DataFrame | None) -> dict[str, float]:
    """The mean row of the evaluation's per-class table (the papers' headline numbers)."""
    if table is None or not len(table):
        return {}
    key = table.columns[0]
    mean = table[table[key].astype(str) == "mean"]
    row = mean.iloc[0] if len(mean) else table.iloc[-1]
    return {k: float(v) for k, v in row.items() if k != key and isinstance(v, (int, float, np.floating)) and np.isfinite(v)}


def served_model_payload(method_name: str, checkpoint: dict, thresholds: dict, export: dict, method,
                         metrics: dict[str, float] | None = None) -> dict[str, Any]:
    """What :class:`uad.framework.io.ServedModelDataset` logs and registers: the checkpoint file, the stored
    thresholds, the frame settings (``params:export``'s ``frame`` / ``short_side`` / ``max_side`` /
    ``tile_overlap``, the infer defaults otherwise), a description and tags naming the method,
    data, training run, thresholds and metrics."""
    meta = checkpoint.get("meta") or {}
    if not checkpoint.get("path"):
        raise ConfigError(f"the {method_name} checkpoint has no file path: export reads a saved checkpoint "
                          f"(run kedro run --pipeline={method_name} first)")
    settings = {"frame": export.get("frame", "full"), "short_side": export.get("short_side"),
                "max_side": export.get("max_side", 1024), "tile_overlap": float(export.get("tile_overlap", 0.25)),
                "class_name": export.get("class_name")}
    metrics = dict(metrics or {})
    thr_img, thr_px = thresholds.get("image"), thresholds.get("pixel")
    spec = method.input_spec
    lines = [f"{method_name} anomaly detector ({method.identity().get('backbone', '')}), trained on "
             f"{', '.join(meta.get('classes') or []) or 'unknown classes'} ({meta.get('setting', 'multi_class')}).",
             f"Input: a column 'image' of encoded image bytes (base64 in JSON). Output per image: score, decision at "
             f"the image threshold {thr_img if thr_img is None else f'{float(thr_img):.6g}'} "
             f"({thresholds.get('image_source', 'none')}), anomalous_area at the pixel threshold "
             f"{thr_px if thr_px is None else f'{float(thr_px):.6g}'}; map at the image's size with params "
             f"{{\"return_map\": true}}.",
             f"Scoring: frame {settings['frame']} (every pixel), images scaled to a {settings['short_side'] or spec['resize']} px "
             f"shorter side, tiles of {spec['crop']} px beyond {settings['max_side']} px.",
             f"Checkpoint {checkpoint.get('path')}, trained in MLflow run {meta.get('mlflow_run_id', 'unknown')}."]
    if metrics:
        lines.append("Test metrics (mean over classes): " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    tags = {"method": method_name, "backbone": method.identity().get("backbone", ""),
            "classes": ",".join(meta.get("classes") or []), "setting": str(meta.get("setting", "multi_class")),
            "trained_in_run": str(meta.get("mlflow_run_id", "unknown")), "checkpoint_version": _checkpoint_version(checkpoint),
            "image_threshold": "" if thr_img is None else f"{float(thr_img):.6g}",
            "pixel_threshold": "" if thr_px is None else f"{float(thr_px):.6g}",
            "threshold_source": str(thresholds.get("image_source", "none")), "frame": settings["frame"],
            **{f"metric.{k}": f"{float(v):.4f}" for k, v in metrics.items()}}
    return {"checkpoint_path": str(checkpoint["path"]), "thresholds": dict(thresholds), "settings": settings,
            "description": "\n\n".join(lines), "tags": tags}
