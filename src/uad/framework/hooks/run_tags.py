"""Run tags (Kedro layer): every MLflow run carries the git commit, the Kedro env, the pipeline,
host and pid; runs left RUNNING by a killed process on this host are ended as KILLED."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any

from kedro.framework.hooks import hook_impl

from uad.osutil import pid_alive

from .common import DEFAULT_RUN_ENV, git_commit, mlflow_if_imported, pipeline_names, set_run_env

log = logging.getLogger(__name__)


def close_dead_runs(client, experiment_id: str, current_run_id: str | None = None) -> list[str]:
    """Runs of ``experiment_id`` still RUNNING whose process (tags ``uad.host`` / ``uad.pid``) no
    longer exists on this host were killed (``kill -9``, power loss): end them as KILLED. A run that
    failed with an exception is ended as FAILED by kedro-mlflow already. Returns the ids closed."""
    closed = []
    host = socket.gethostname()
    runs = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=200)
    for run in runs:
        tags = run.data.tags
        if run.info.run_id == current_run_id or tags.get("uad.host") != host:
            continue
        try:
            pid = int(tags.get("uad.pid", ""))
        except ValueError:
            continue
        if pid != os.getpid() and not pid_alive(pid):
            client.set_terminated(run.info.run_id, status="KILLED")
            closed.append(run.info.run_id)
    return closed


class RunTagsHook:
    """Tags every MLflow run with the git commit, the Kedro env (the default run env when none was
    given), the pipeline name, and the host and process id that ran it; on the way, runs left
    RUNNING by a killed process on this host are ended as KILLED."""

    def __init__(self) -> None:
        self._project_path: Path | None = None
        self._env: str | None = None

    @hook_impl
    def after_context_created(self, context) -> None:
        self._project_path = Path(context.project_path)
        self._env = context.env
        set_run_env(context.env)

    @hook_impl(trylast=True)
    def before_pipeline_run(self, run_params: dict[str, Any]) -> None:
        mlflow = mlflow_if_imported()
        if mlflow is None:
            return
        active = mlflow.active_run()
        if active is None:
            return
        env = run_params.get("env") or self._env or DEFAULT_RUN_ENV
        mlflow.set_tags({
            "git_commit": git_commit(self._project_path or Path.cwd()),
            "kedro_env": str(env),
            "pipeline": ",".join(pipeline_names(run_params)),
            "uad.host": socket.gethostname(),
            "uad.pid": str(os.getpid()),
        })
        try:
            closed = close_dead_runs(mlflow.tracking.MlflowClient(), active.info.experiment_id, active.info.run_id)
        except Exception as exc:  # noqa: BLE001 - bookkeeping must never stop a run
            log.warning("could not check for killed MLflow runs: %s", exc)
            return
        if closed:
            log.info("MLflow: %d run(s) left RUNNING by a killed process ended as KILLED: %s", len(closed), closed)
