"""Project hooks (Kedro layer): run-level MLflow tags that no node knows on its own."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from kedro.framework.hooks import hook_impl


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


class RunTagsHook:
    """Tags every MLflow run with the git commit, the Kedro env and the pipeline name."""

    def __init__(self) -> None:
        self._project_path: Path | None = None
        self._env: str | None = None

    @hook_impl
    def after_context_created(self, context) -> None:
        self._project_path = Path(context.project_path)
        self._env = context.env

    @hook_impl(trylast=True)
    def before_pipeline_run(self, run_params: dict[str, Any]) -> None:
        try:
            import mlflow
        except ImportError:  # pragma: no cover - mlflow is a dependency
            return
        if mlflow.active_run() is None:
            return
        mlflow.set_tags({
            "git_commit": git_commit(self._project_path or Path.cwd()),
            "kedro_env": str(run_params.get("env") or self._env or "local"),
            "pipeline": ",".join(run_params.get("pipeline_names") or [run_params.get("pipeline_name") or "__default__"]),
        })
