"""kedro-mlflow's hook for tracked runs only (Kedro layer).

:class:`LazyTrackingHook` is what ``settings.HOOKS`` registers: it imports
:class:`uad.framework.hooks.tracking.TrackingHook` (and with it mlflow) only when a pipeline that MLflow tracks
starts, so ``kedro registry list``, ``--help`` and ``kedro run --pipeline=ingest`` never pay the
import (about a second on a small machine).
"""

from __future__ import annotations

import sys
from typing import Any

from kedro.framework.hooks import hook_impl

from uad.framework.kedro_internals import switch_off_mlflow_logging

from .common import pipeline_names


def _tracked(context: Any, names: list[str]) -> bool:
    """Whether kedro-mlflow tracks a run of ``names``: not when every one is listed under
    ``tracking.disable_tracking.pipelines`` of ``mlflow.yml`` (its own rule, read without mlflow).
    When ``mlflow.yml`` cannot be read here (an interpolation only kedro-mlflow resolves, such as
    ``${km.random_name:}``), the run counts as tracked and kedro-mlflow reads it itself."""
    from kedro.config import MissingConfigException

    loader = context.config_loader
    if "mlflow" not in loader.config_patterns:
        loader.config_patterns.update({"mlflow": ["mlflow*", "mlflow*/**", "**/mlflow*"]})
    try:
        conf = loader["mlflow"] or {}
    except MissingConfigException:
        conf = {}
    except Exception:  # noqa: BLE001 - kedro-mlflow's own reading reports a bad file
        return True
    disabled = ((conf.get("tracking") or {}).get("disable_tracking") or {}).get("pipelines") or []
    return not all(n in disabled for n in names)


def _switch_off_mlflow_datasets(pipeline: Any, catalog: Any) -> None:
    """An untracked run's kedro-mlflow datasets (metrics) must not log: left on, the first would
    start an MLflow run of its own. kedro-mlflow switches off only the datasets already built;
    these are built here first (only they: an ingest run has none and imports nothing)."""
    get_type = getattr(catalog, "get_type", None)
    for name in pipeline.datasets():
        try:
            kind = (get_type(name) if get_type is not None else None) or ""
            if kind.startswith("kedro_mlflow"):
                switch_off_mlflow_logging(catalog[name])
        except Exception:  # noqa: BLE001 - a dataset the run cannot build fails the run itself, with its message
            continue


def _mlflow_command_running() -> bool:
    """A ``kedro mlflow ...`` command (its module is imported only then: uad.framework.kedro_internals) reads
    ``context.mlflow``, which kedro-mlflow's hook sets when the context is created."""
    return "kedro_mlflow.framework.cli.cli" in sys.modules


class LazyTrackingHook:
    """:class:`uad.framework.hooks.tracking.TrackingHook` (kedro-mlflow's hook), imported and set up only for a run
    MLflow tracks: ``kedro registry list``, ``--help`` or ``kedro run --pipeline=ingest`` never
    import mlflow (about a second on a small machine). The session's context and catalog are kept
    and handed to the real hook, in Kedro's order, when a tracked pipeline starts; the hooks that
    follow go to it for that run only."""

    def __init__(self) -> None:
        self._real: Any = None
        self._active: Any = None
        self._context: Any = None
        self._delivered: Any = None  # the context the real hook has already seen
        self._catalog_args: tuple | None = None

    def _hook(self) -> Any:
        if self._real is None:
            from uad.framework.hooks.tracking import TrackingHook

            self._real = TrackingHook()
        return self._real

    @hook_impl
    def after_context_created(self, context) -> None:
        self._context, self._catalog_args, self._active, self._delivered = context, None, None, None
        if _mlflow_command_running():  # kedro mlflow ui / modelify: at once, as kedro-mlflow does
            self._hook().after_context_created(context)
            self._delivered = context

    @hook_impl
    def after_catalog_created(self, catalog, conf_catalog, conf_creds, parameters, save_version, load_versions) -> None:
        self._catalog_args = (catalog, conf_catalog, conf_creds, parameters, save_version, load_versions)

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        self._active = None
        if self._context is None:
            return
        if not _tracked(self._context, pipeline_names(run_params)):
            _switch_off_mlflow_datasets(pipeline, catalog)
            return
        real = self._hook()
        if self._delivered is not self._context:
            real.after_context_created(self._context)
            self._delivered = self._context
        if self._catalog_args is not None:
            real.after_catalog_created(*self._catalog_args)
        self._active = real
        real.before_pipeline_run(run_params, pipeline, catalog)

    @hook_impl
    def before_node_run(self, node, catalog, inputs: dict[str, Any], is_async: bool) -> None:
        if self._active is not None:
            self._active.before_node_run(node, catalog, inputs, is_async)

    @hook_impl
    def after_node_run(self, node, catalog, inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
        if self._active is not None:
            self._active.after_node_run(node, catalog, inputs, outputs)

    @hook_impl
    def after_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        if self._active is not None:
            self._active.after_pipeline_run(run_params, pipeline, catalog)

    @hook_impl
    def on_pipeline_error(self, error: Exception, run_params: dict[str, Any], pipeline, catalog) -> None:
        if self._active is not None:
            active, self._active = self._active, None
            active.on_pipeline_error(error, run_params, pipeline, catalog)
