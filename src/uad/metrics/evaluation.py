"""The evaluation of a run's predictions: the papers' seven metrics per class and their mean (AU-PRO
to ``evaluation.aupro_limit``), beside them SegF1, AU-PRO to ``evaluation.aupro_second_limit`` and
AUPIMO (:mod:`uad.metrics.mvtec_ad2`) wherever there are masks, the
plug-in's base beside it (``base/``, ``gain/``), the full-frame figures ``infer`` will see, and the
decision thresholds inference applies. Core library: numpy / pandas; no kedro, no mlflow (the
``mlflow_metrics`` it returns are plain ``{key: {"value", "step"}}`` rows a tracker logs)."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from .metrics import METRIC_NAMES, auroc, compute_metrics

log = logging.getLogger(__name__)

__all__ = ["check_evaluation", "evaluate_predictions"]


def _limit(evaluation: dict, key: str, default: float) -> float:
    from uad.errors import ConfigError

    val = evaluation.get(key, default)
    try:
        val = float(val)
    except (TypeError, ValueError):
        val = -1.0
    if not 0.0 < val <= 1.0:
        raise ConfigError(f"evaluation.{key}: {evaluation.get(key)!r} is not a false-positive rate in (0, 1]; "
                          f"e.g. {default} (MVTec-AD integrates AU-PRO to 0.3, MVTec AD 2 to 0.05)")
    return val


def check_evaluation(evaluation: dict) -> None:
    """Every ``evaluation.*`` setting the evaluation reads, checked at once (the ``predict`` node
    calls it before scoring, :func:`evaluate_predictions` again): one :class:`uad.errors.ConfigError`
    naming the setting and the fix. A rule is checked whether or not this run's data has masks or
    validation normals to use it on, so a typo never passes unnoticed until another dataset."""
    from uad.errors import ConfigError

    from .thresholds import THRESHOLD_RULES

    evaluation = evaluation or {}
    for key, why in (("threshold_rule", "fpr: a false-positive rate on normals"),
                     ("segf1_rule", "mean_std is the MVTec AD 2 paper's rule")):
        rule = evaluation.get(key, "fpr" if key == "threshold_rule" else "mean_std")
        if rule not in THRESHOLD_RULES:
            raise ConfigError(f"evaluation.{key}: {rule!r} is not one of {', '.join(THRESHOLD_RULES)} ({why}); "
                              f"e.g. --params=\"evaluation.{key}=mean_std\"")
    k = evaluation.get("threshold_std_k", 3.0)
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not np.isfinite(k) or k < 0:
        raise ConfigError(f"evaluation.threshold_std_k: {k!r} is not a non-negative number (the k of mean + k std); "
                          "e.g. 3, the MVTec AD 2 paper's")
    fpr = evaluation.get("threshold_fpr", 0.01)
    if isinstance(fpr, bool) or not isinstance(fpr, (int, float)) or not 0.0 < fpr < 1.0:
        raise ConfigError(f"evaluation.threshold_fpr: {fpr!r} is not a false-positive rate in (0, 1); e.g. 0.01")
    _limit(evaluation, "aupro_limit", 0.3)
    _limit(evaluation, "aupro_second_limit", 0.05)


def _extra_metrics(predictions: dict[str, np.ndarray], evaluation: dict):
    """:func:`uad.metrics.mvtec_ad2.extra_metrics` from the predictions and the evaluation's
    parameters (``segf1_rule``, ``threshold_std_k``, ``threshold_fpr``, ``aupro_second_limit``)."""
    from .mvtec_ad2 import extra_metrics

    check_evaluation(evaluation)
    rule = str(evaluation.get("segf1_rule", "mean_std"))
    return extra_metrics(predictions["labels"], predictions["masks"].astype(bool), predictions["maps"],
                         predictions["class_names"], predictions.get("validation_maps"),
                         predictions.get("validation_class_names"), rule=rule,
                         k=float(evaluation.get("threshold_std_k", 3.0)),
                         fpr=float(evaluation.get("threshold_fpr", 0.01)),
                         second_limit=_limit(evaluation, "aupro_second_limit", 0.05))


def evaluate_predictions(predictions: dict[str, np.ndarray], evaluation: dict) -> tuple[pd.DataFrame, dict, dict]:
    """The seven metrics per class and their mean (the papers' protocol), and the decision
    thresholds inference will apply (:func:`uad.metrics.thresholds.compute_thresholds`: from the
    validation normals by ``evaluation.threshold_rule`` where the predictions hold them
    (``validation_scores`` / ``validation_maps``, ``validation_full_*``), else F1-optimal on this
    labelled split, or at ``evaluation.threshold_fpr`` on normal images without labels)."""
    from .thresholds import compute_thresholds

    check_evaluation(evaluation)
    has_masks = bool(predictions["masks"].any()) and evaluation.get("pixel", True)
    limit = _limit(evaluation, "aupro_limit", 0.3)
    table = compute_metrics(predictions["labels"], predictions["scores"], predictions["masks"].astype(bool),
                            predictions["maps"], predictions["class_names"], pixel=has_masks, fpr_limit=limit)
    names = METRIC_NAMES
    if has_masks:  # SegF1 (threshold on the validation normals), AU-PRO at the second limit, AUPIMO
        extra = _extra_metrics(predictions, evaluation)
        names = (*METRIC_NAMES, *[c for c in extra.columns if c != "segf1_threshold"])
        table = table.join(extra)
    mlflow_metrics: dict[str, dict[str, float]] = {}
    for cls, row in table.iterrows():
        for name in names:
            val = row.get(name)
            if val is None or not np.isfinite(val):
                continue
            key = name if cls == "mean" else f"{cls}/{name}"
            mlflow_metrics[key] = {"value": float(val), "step": 0}
    if "scoring_img_per_s" in predictions:
        mlflow_metrics["scoring_img_per_s"] = {"value": float(predictions["scoring_img_per_s"]), "step": 0}
    mlflow_metrics["n_test_images"] = {"value": float(len(predictions["scores"])), "step": 0}
    mean = table.loc["mean"]
    shown = ", ".join(f"{m}={mean[m]:.4f}" for m in names if m in mean and np.isfinite(mean[m]))
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
    if "segf1_threshold" in table.columns:  # the per-class pixel thresholds SegF1 and the submission use
        per = {str(c): float(v) for c, v in table["segf1_threshold"].items() if c != "mean" and np.isfinite(v)}
        if per:
            thresholds["per_class_pixel"] = per
            thresholds["per_class_pixel_source"] = f"validation_{evaluation.get('segf1_rule', 'mean_std')}"
        if "full" in thresholds and "validation_full_maps" in predictions:  # the same rule on infer's frame
            from .thresholds import normal_threshold

            vmaps, vcls = predictions["validation_full_maps"], np.asarray(predictions["validation_class_names"]).astype(str)
            rule = str(evaluation.get("segf1_rule", "mean_std"))
            thresholds["full"]["per_class_pixel"] = {
                c: normal_threshold(np.asarray(vmaps[vcls == c], np.float32), rule,
                                    float(evaluation.get("threshold_fpr", 0.01)), float(evaluation.get("threshold_std_k", 3.0)))
                for c in sorted(set(vcls.tolist()))}
            thresholds["full"]["per_class_pixel_source"] = f"validation_{rule}"
    for key in ("image", "pixel"):
        if key in thresholds:
            mlflow_metrics[f"threshold_{key}"] = {"value": float(thresholds[key]), "step": 0}
    log.info("decision thresholds: image %.6g (%s)%s", thresholds["image"], thresholds["image_source"],
             f", pixel {thresholds['pixel']:.6g} ({thresholds['pixel_source']})" if "pixel" in thresholds else "")
    return table.reset_index().rename(columns={"index": "class_name"}), mlflow_metrics, thresholds
