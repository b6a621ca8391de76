"""What the project's hooks share (Kedro layer): the run's environment, pipeline names, the git
commit, and MLflow only when something else imported it."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

#: the environment ``kedro run`` uses without ``--env`` (settings.py reads it from here, so the
#: hooks never import the settings back)
DEFAULT_RUN_ENV = "quick"

log = logging.getLogger(__name__)

_RUN_ENV: str | None = None


def pipeline_names(run_params: dict[str, Any]) -> list[str]:
    """The pipelines a run ran (``--pipeline`` / ``--pipelines``; ``__default__`` when none)."""
    names = run_params.get("pipeline_names") or run_params.get("pipeline_name") or ["__default__"]
    return [names] if isinstance(names, str) else list(names)



def set_run_env(env: str | None) -> None:
    """Record the Kedro environment of the session that starts (read by :func:`current_run_env`)."""
    global _RUN_ENV
    _RUN_ENV = env or DEFAULT_RUN_ENV


def current_run_env() -> str:
    """The Kedro environment of the session running now (the default run env when none was given)."""
    return _RUN_ENV or DEFAULT_RUN_ENV


def git_commit(path: Path) -> str:
    """The checked-out commit (with ``-dirty`` when the tree has changes), or ``unknown``."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=path,
                               capture_output=True, text=True, timeout=5)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"



def mlflow_if_imported():
    """mlflow when something imported it (the tracking hook does, for a tracked run), else None:
    never imported, it can have no active run, and these hooks must not pay its import."""
    return sys.modules.get("mlflow")


def mlflow_run_line() -> str | None:
    mlflow = mlflow_if_imported()
    if mlflow is None:
        return None
    run = mlflow.active_run()
    if run is None:
        return None
    uri = mlflow.get_tracking_uri()
    exp, rid = run.info.experiment_id, run.info.run_id
    if uri.startswith(("http://", "https://")):
        return f"MLflow run {rid}: {uri.rstrip('/')}/#/experiments/{exp}/runs/{rid}"
    return (f"MLflow run {rid} (experiment {exp}, store {uri}): open it with  mlflow ui --backend-store-uri {uri}  "
            f"then http://127.0.0.1:5000/#/experiments/{exp}/runs/{rid}")


def log_metric(key: str, value: float) -> None:
    try:
        mlflow = mlflow_if_imported()
        if mlflow is not None and mlflow.active_run() is not None:
            mlflow.log_metric(key, float(value))
    except Exception as exc:  # noqa: BLE001 - bookkeeping must never stop a run
        log.debug("could not log %s to MLflow: %s", key, exc)
