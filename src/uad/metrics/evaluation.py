"""The evaluation of a run's predictions: the papers' seven metrics per class and their mean, the
plug-in's base beside it (``base/``, ``gain/``), the full-frame figures ``infer`` will see, and the
decision thresholds inference applies. Core library: numpy / pandas; no kedro, no mlflow (the
``mlflow_metrics`` it returns are plain ``{key: {"value", "step"}}`` rows a tracker logs)."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from .metrics import METRIC_NAMES, auroc, compute_metrics

log = logging.getLogger(__name__)

__all__ = ["evaluate_predictions"]


def evaluate_predictions(predictions: dict[str, np.ndarray], evaluation: dict) -> tuple[pd.DataFrame, dict, dict]:
    """The seven metrics per class and their mean (the papers' protocol), and the decision
    thresholds inference will apply (:func:`uad.metrics.thresholds.compute_thresholds`: from the
    validation normals by ``evaluation.threshold_rule`` where the predictions hold them
    (``validation_scores`` / ``validation_maps``, ``validation_full_*``), else F1-optimal on this
    labelled split, or at ``evaluation.threshold_fpr`` on normal images without labels)."""
    from .thresholds import compute_thresholds

    has_masks = bool(predictions["masks"].any()) and evaluation.get("pixel", True)
    table = compute_metrics(predictions["labels"], predictions["scores"], predictions["masks"].astype(bool),
                            predictions["maps"], predictions["class_names"], pixel=has_masks)
    mlflow_metrics: dict[str, dict[str, float]] = {}
    for cls, row in table.iterrows():
        for name in METRIC_NAMES:
            val = row.get(name)
            if val is None or not np.isfinite(val):
                continue
            key = name if cls == "mean" else f"{cls}/{name}"
            mlflow_metrics[key] = {"value": float(val), "step": 0}
    if "scoring_img_per_s" in predictions:
        mlflow_metrics["scoring_img_per_s"] = {"value": float(predictions["scoring_img_per_s"]), "step": 0}
    mlflow_metrics["n_test_images"] = {"value": float(len(predictions["scores"])), "step": 0}
    mean = table.loc["mean"]
    shown = ", ".join(f"{m}={mean[m]:.4f}" for m in METRIC_NAMES if m in mean and np.isfinite(mean[m]))
    log.info("mean over classes: %s", shown or "no metric (the test split has no anomalous image: normal-only data)")
    if "base_scores" in predictions:  # a plug-in: the base's metrics and the gain, side by side
        base = compute_metrics(predictions["labels"], predictions["base_scores"], predictions["masks"].astype(bool),
                               predictions["base_maps"], predictions["class_names"], pixel=has_masks)
        for cls, row in base.iterrows():
            for name in METRIC_NAMES:
                val, mine = row.get(name), table.loc[cls].get(name)
                if val is None or not np.isfinite(val):
                    continue
                key = name if cls == "mean" else f"{cls}/{name}"
                mlflow_metrics[f"base/{key}"] = {"value": float(val), "step": 0}
                if mine is not None and np.isfinite(mine):
                    mlflow_metrics[f"gain/{key}"] = {"value": float(mine - val), "step": 0}
        table = table.join(base[[m for m in METRIC_NAMES if m in base.columns]].add_prefix("base_"))
        log.info("base detector: %s", ", ".join(f"{m}={base.loc['mean'][m]:.4f}" for m in METRIC_NAMES
                                                 if m in base.columns and np.isfinite(base.loc["mean"][m])))
    rule = {"fpr": float(evaluation.get("threshold_fpr", 0.01)), "rule": str(evaluation.get("threshold_rule", "fpr")),
            "k": float(evaluation.get("threshold_std_k", 3.0))}
    thresholds = compute_thresholds(predictions["labels"], predictions["scores"],
                                    predictions["masks"] if has_masks else None,
                                    predictions["maps"] if has_masks else None,
                                    validation_scores=predictions.get("validation_scores"),
                                    validation_maps=predictions.get("validation_maps"), **rule)
    thresholds["frame"] = "crop"
    if "full_scores" in predictions:  # the full frame inference scores: its own thresholds and headline metrics
        full = compute_thresholds(predictions["labels"], predictions["full_scores"],
                                  predictions["full_masks"] if has_masks else None,
                                  predictions["full_maps"] if has_masks else None,
                                  validation_scores=predictions.get("validation_full_scores"),
                                  validation_maps=predictions.get("validation_full_maps"), **rule)
        thresholds["full"] = {**full, "frame": "full"}
        for key in ("image", "pixel"):
            if key in full:
                mlflow_metrics[f"full_frame/threshold_{key}"] = {"value": float(full[key]), "step": 0}
        labels = np.asarray(predictions["labels"])
        if 0 < labels.sum() < labels.size:
            mlflow_metrics["full_frame/image_auroc"] = {"value": float(auroc(labels, predictions["full_scores"])), "step": 0}
        if has_masks:
            m, v = predictions["full_masks"].reshape(-1).astype(bool), predictions["full_maps"].reshape(-1).astype(np.float32)
            step = max(1, v.size // 4_000_000)
            mlflow_metrics["full_frame/pixel_auroc"] = {"value": float(auroc(m[::step], v[::step])), "step": 0}
        log.info("full frame (what infer scores): %s; thresholds image %.6g%s", ", ".join(
            f"{k.split('/')[1]}={v['value']:.4f}" for k, v in mlflow_metrics.items() if k.startswith("full_frame/") and "auroc" in k),
            full["image"], f", pixel {full['pixel']:.6g}" if "pixel" in full else "")
    for key in ("image", "pixel"):
        if key in thresholds:
            mlflow_metrics[f"threshold_{key}"] = {"value": float(thresholds[key]), "step": 0}
    log.info("decision thresholds: image %.6g (%s)%s", thresholds["image"], thresholds["image_source"],
             f", pixel {thresholds['pixel']:.6g} ({thresholds['pixel_source']})" if "pixel" in thresholds else "")
    return table.reset_index().rename(columns={"index": "class_name"}), mlflow_metrics, thresholds
