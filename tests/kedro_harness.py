"""Run real Kedro sessions of this project in an isolated copy (conf + pyproject) under tmp."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SEVEN = ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro")
CLASSES = ("fabric", "pcb", "washer", "wood")


def make_project_copy(dest: Path) -> Path:
    """A throw-away project: the real conf/ and pyproject.toml, an empty data/ tree."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(PROJECT_ROOT / "conf", dest / "conf", dirs_exist_ok=True)
    for f in ("pyproject.toml", ".telemetry"):
        shutil.copy2(PROJECT_ROOT / f, dest / f)
    # Kedro wants a source folder inside the project; the package itself is the installed one.
    (dest / "src").mkdir(exist_ok=True)
    for d in ("01_raw", "02_intermediate", "04_feature", "06_models", "07_model_output", "08_reporting"):
        (dest / "data" / d).mkdir(parents=True, exist_ok=True)
    return dest


def tracked_project(tmp_path_factory):
    """A throw-away project whose MLflow runs go to its own ``mlflow.db`` (generator for a
    module-scoped fixture: ``yield from tracked_project(tmp_path_factory)``)."""
    root = make_project_copy(tmp_path_factory.mktemp("project"))
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    try:
        yield root
    finally:
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old


def run_pipeline(project: Path, pipeline: str, env: str = "smoke", params: dict[str, Any] | None = None,
                 load_versions: dict[str, str] | None = None, namespaces: list[str] | None = None,
                 node_names: list[str] | None = None) -> dict:
    """``kedro run --pipeline=<pipeline> --env=<env> --params=... [--nodes=...]`` inside ``project``."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    cwd = os.getcwd()
    os.chdir(project)
    try:
        bootstrap_project(project)
        with KedroSession.create(project_path=project, env=env, runtime_params=_nest(params or {})) as session:
            return session.run(pipeline_name=pipeline, load_versions=load_versions or {}, namespaces=namespaces,
                               node_names=node_names)
    finally:
        os.chdir(cwd)


def last_run(tracking_uri: str, experiment: str | None = None):
    """The newest MLflow run of ``experiment`` (default: of every experiment; runs go to one
    experiment per dataset, ``uad-<dataset>``)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    if experiment is None:
        ids = [e.experiment_id for e in client.search_experiments()]
    else:
        exp = client.get_experiment_by_name(experiment)
        assert exp is not None, f"no MLflow experiment {experiment!r} at {tracking_uri}"
        ids = [exp.experiment_id]
    runs = client.search_runs(ids, order_by=["attributes.start_time DESC"], max_results=1)
    assert runs, "no MLflow run was recorded"
    return client, runs[0]


def _nest(params: dict[str, Any]) -> dict[str, Any]:
    """``{"data.setting": x}`` -> ``{"data": {"setting": x}}``, as ``kedro run --params`` does."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _versions(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _check_metrics(run, method: str, min_image_auroc: float) -> None:
    m = run.data.metrics
    for name in SEVEN:
        assert name in m, f"{method}: MLflow run lacks {name}"
        for cls in CLASSES:
            assert f"{cls}/{name}" in m
    assert m["image_auroc"] >= min_image_auroc, f"{method}: image AUROC {m['image_auroc']:.3f}"
    assert m["pixel_auroc"] >= min_image_auroc
    tags = run.data.tags
    assert tags["method"] == method
    assert tags["dataset"] == "synthetic" and tags["setting"] == "multi_class"
    assert tags["weights_source"] and tags["backbone"]
    assert tags["git_commit"]


def _latest(folder: Path, name: str) -> Path:
    return sorted(folder.iterdir())[-1] / name
