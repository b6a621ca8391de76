"""The train -> predict -> evaluate -> report template every method shares: thin Kedro nodes.

Each node turns its parameters into arguments and calls one core function; nothing here is
specific to one method, and nothing here does the work:

| node | core function |
| --- | --- |
| ``compose_params`` | :func:`uad.engine.orchestration.compose_plugin_params` |
| ``train_<stage>`` | :func:`uad.engine.orchestration.train_stage` |
| ``extract_features`` | :func:`uad.engine.orchestration.extract_features` |
| ``predict`` | :func:`uad.engine.orchestration.predict_split` |
| ``evaluate`` | :func:`uad.metrics.evaluation.evaluate_predictions` |
| ``report`` | :func:`uad.metrics.report.build_report` (the MLflow run id read here) |
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["compose_plugin_params", "train_stage", "extract_features", "predict", "evaluate", "report"]


def compose_plugin_params(method_params: dict, base_name: str, base_params: dict) -> dict:
    """A plug-in's parameters: its own block plus its base's name and parameters."""
    from uad.engine.orchestration import compose_plugin_params as compose

    return compose(method_params, base_name, base_params)


def train_stage(method_name: str, stage: str, train_index: pd.DataFrame, data: dict, method_params: dict,
                engine: dict, engine_override: dict, synthesis: dict | None = None,
                previous: dict | None = None, features: dict | None = None,
                base: dict | None = None, synthesis_params: dict | None = None,
                validation_index: pd.DataFrame | None = None) -> tuple[dict, dict, dict]:
    """``train_<stage>``: (checkpoint, loss history for MLflow, run tags); see
    :func:`uad.engine.orchestration.train_stage`."""
    from uad.engine import orchestration

    return orchestration.train_stage(method_name, stage, train_index, data, method_params, engine, engine_override,
                                     synthesis=synthesis, previous=previous, features=features, base=base,
                                     synthesis_params=synthesis_params, validation_index=validation_index)


def extract_features(method_name: str, train_index: pd.DataFrame, data: dict, method_params: dict, engine: dict,
                     engine_override: dict, base: dict | None = None) -> dict:
    """``extract_features``: the features stage (:func:`uad.engine.orchestration.extract_features`)."""
    from uad.engine import orchestration

    return orchestration.extract_features(method_name, train_index, data, method_params, engine, engine_override,
                                          base=base)


def predict(method_name: str, test_index: pd.DataFrame, data: dict, method_params: dict, engine: dict,
            engine_override: dict, checkpoint: dict, infer: dict | None = None,
            evaluation: dict | None = None, validation_index: pd.DataFrame | None = None) -> dict[str, np.ndarray]:
    """``predict``: the test split (and the validation normals, ``validation_*`` keys) by the
    evaluation protocol and in the full frame (:func:`uad.engine.orchestration.predict_split`)."""
    from uad.engine import orchestration
    from uad.metrics.evaluation import check_evaluation

    check_evaluation(evaluation or {})  # a wrong evaluation.* setting: one line before scoring, not after
    return orchestration.predict_split(method_name, test_index, data, method_params, engine, engine_override,
                                       checkpoint, infer=infer, evaluation=evaluation,
                                       validation_index=validation_index)


def evaluate(predictions: dict[str, np.ndarray], evaluation: dict) -> tuple[pd.DataFrame, dict, dict]:
    """``evaluate``: (metrics table, MLflow metrics, thresholds); see
    :func:`uad.metrics.evaluation.evaluate_predictions`."""
    from uad.metrics.evaluation import evaluate_predictions

    return evaluate_predictions(predictions, evaluation)


def report(method_name: str, predictions: dict[str, np.ndarray], metrics_table: pd.DataFrame, reporting: dict,
           thresholds: dict | None = None, data: dict | None = None) -> tuple[bytes, bytes, bytes, str]:
    """``report``: overlays, curves, per-class chart and the HTML page
    (:func:`uad.metrics.report.build_report`), titled with this run's MLflow id when one is open."""
    from uad.metrics.report import build_report

    return build_report(method_name, predictions, metrics_table, reporting, thresholds, data, run_id=_active_run_id())


def _active_run_id() -> str:
    from uad.framework.hooks.common import mlflow_if_imported  # never imports mlflow itself

    mlflow = mlflow_if_imported()
    try:
        run = mlflow.active_run() if mlflow is not None else None
    except Exception:  # noqa: BLE001 - a title must never fail a report
        return ""
    return run.info.run_id if run is not None else ""
