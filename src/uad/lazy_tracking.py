"""kedro-mlflow's hook for tracked runs only (Kedro layer).

:class:`LazyTrackingHook` is what ``settings.HOOKS`` registers: it imports
:class:`uad.tracking.TrackingHook` (and with it mlflow) only when a pipeline that MLflow tracks
starts, so ``kedro registry list``, ``--help`` and ``kedro run --pipeline=ingest`` never pay the
import (about a second on a small machine).
"""

from __future__ import annotations

from typing import Any

from kedro.framework.hooks import hook_impl

from uad.hooks import pipeline_names


def _tracked(context: Any, names: list[str]) -> bool:
    """Whether kedro-mlflow tracks a run of ``names``: not when every one is listed under
    ``tracking.disable_tracking.pipelines`` of ``mlflow.yml`` (its own rule, read without mlflow)."""
    from kedro.config import MissingConfigException

    loader = context.config_loader
    if "mlflow" not in loader.config_patterns:
        loader.config_patterns.update({"mlflow": ["mlflow*", "mlflow*/**", "**/mlflow*"]})
    try:
        conf = loader["mlflow"] or {}
    except MissingConfigException:
        conf = {}
    disabled = ((conf.get("tracking") or {}).get("disable_tracking") or {}).get("pipelines") or []
    return not all(n in disabled for n in names)


class LazyTrackingHook:
    """:class:`uad.tracking.TrackingHook` (kedro-mlflow's hook), imported and set up only for a run
    MLflow tracks: ``kedro registry list``, ``--help`` or ``kedro run --pipeline=ingest`` never
    import mlflow (about a second on a small machine). The session's context and catalog are kept
    and handed to the real hook, in Kedro's order, when a tracked pipeline starts; the hooks that
    follow go to it for that run only."""

    def __init__(self) -> None:
        self._real: Any = None
        self._active: Any = None
        self._context: Any = None
        self._catalog_args: tuple | None = None

    @hook_impl
    def after_context_created(self, context) -> None:
        self._context, self._catalog_args, self._active = context, None, None

    @hook_impl
    def after_catalog_created(self, catalog, conf_catalog, conf_creds, parameters, save_version, load_versions) -> None:
        self._catalog_args = (catalog, conf_catalog, conf_creds, parameters, save_version, load_versions)

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        self._active = None
        if self._context is None or not _tracked(self._context, pipeline_names(run_params)):
            return
        if self._real is None:
            from uad.tracking import TrackingHook

            self._real = TrackingHook()
        self._real.after_context_created(self._context)
        if self._catalog_args is not None:
            self._real.after_catalog_created(*self._catalog_args)
        self._active = self._real
        self._real.before_pipeline_run(run_params, pipeline, catalog)

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
