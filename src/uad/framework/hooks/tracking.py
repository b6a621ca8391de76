"""MLflow tracking of ``kedro run`` (Kedro layer): kedro-mlflow's hook, made to serve comparison.

:class:`TrackingHook` is kedro-mlflow's ``MlflowHook`` (the plug-in's own instance is disabled in
``settings.py``) with four changes:

* **Runs a person can tell apart.** Each run is named ``<method> [<action>] <dataset> <setting>
  <env>`` (``dinomaly synthetic multi_class smoke``, ``dinomaly export synthetic multi_class
  smoke``) and tagged ``uad.method`` / ``uad.dataset`` / ``uad.setting`` / ``uad.env`` /
  ``uad.action``; the training data is logged as an MLflow dataset input (name, a digest of its
  content fingerprint, the sample index file as its source) so the runs table's Dataset column
  shows it.
* **One experiment per dataset.** ``mlflow.yml`` names the experiment ``per-dataset`` unless
  ``MLFLOW_EXPERIMENT_NAME`` is set; the hook then uses ``uad-<dataset>`` (``uad-synthetic``,
  ``uad-mvtec``), so runs on the embedded data never mix with a real benchmark's.
* **Parameters that line up across methods.** kedro-mlflow logs every ``params:`` input under its
  namespaced name (``dinomaly.method.lr``), and logs the *profile's* values. Here the hook logs
  only the run-level blocks (``evaluation``, ``reporting``, ``infer``, ``export``); the model's
  parameters (``method.*`` resolved with their code defaults, ``data.*``, ``engine.*``,
  ``synthesis.*``) are logged by the nodes that know them: training logs what it trained with,
  and export / infer log what the checkpoint they use stores (``param:`` entries of the run-tags
  datasets, :class:`uad.framework.io.datasets.MlflowTagsDataset`). MLflow parameters cannot be
  changed once logged, so a profile's value can never sit beside a checkpoint's.
* **Tracking starts only when a run is tracked.** The store is opened (and created), and the
  catalog's metric datasets named, in ``before_pipeline_run`` rather than when the context and
  catalog are made, and pipelines listed under
  ``disable_tracking`` (``ingest``) never touch it: ``kedro run --pipeline=ingest`` does not pay
  for opening the MLflow database.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import mlflow
from kedro.framework.hooks import hook_impl
from kedro_mlflow.framework.hooks.mlflow_hook import MlflowHook

from uad.data.sources import dataset_name
from uad.framework.kedro_internals import (
    catalog_dataset,
    dataset_file,
    defer_mlflow_setup,
    hook_tracking,
    mlflow_enabled_for,
)

from .common import DEFAULT_RUN_ENV, pipeline_names

log = logging.getLogger(__name__)

#: the experiment name in ``mlflow.yml`` that means "one experiment per dataset"
PER_DATASET = "per-dataset"
#: parameter blocks the hook logs from a node's inputs (they are not the model's)
RUN_BLOCKS = ("evaluation", "reporting", "infer", "export", "benchmark")
#: pipeline name prefixes that use a trained model: the action in the run name
ACTIONS = ("infer", "export", "evaluate", "features")


def run_identity(run_params: dict[str, Any], data: dict[str, Any] | None, env: str | None) -> dict[str, str]:
    """``method``, ``action``, ``dataset``, ``setting``, ``env`` and the run ``name`` of a run."""
    names = pipeline_names(run_params)
    first = names[0]
    if first == "__default__":
        from uad.pipeline_registry import DEFAULT_PIPELINE

        first = DEFAULT_PIPELINE
    action = ""
    for a in ACTIONS:
        if first == a or first.startswith(a + "_"):
            action, first = a, first[len(a) + 1:] or ",".join(run_params.get("namespaces") or []) or "all"
            break
    setting = str((data or {}).get("setting", "multi_class"))
    out = {"method": first, "action": action, "dataset": dataset_name(data), "setting": setting,
           "env": str(env or DEFAULT_RUN_ENV)}
    out["name"] = " ".join(v for v in (out["method"], action, out["dataset"], setting, out["env"]) if v)
    return out


#: seconds a tracking server gets to answer before the run stops with one line
SERVER_TIMEOUT_S = 15.0  # a refused connection fails at once; a busy server gets this long


def check_server(uri: str, timeout: float = SERVER_TIMEOUT_S) -> None:
    """An ``http(s)://`` tracking URI must answer its ``/health`` endpoint within ``timeout``
    seconds; otherwise one :class:`~uad.errors.ConfigError` names the URI and the two fixes,
    before anything trains (MLflow itself would retry for minutes, then raise a long traceback)."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    from uad.errors import ConfigError

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
            if resp.status < 500:
                return
            reason = f"HTTP {resp.status}"
    except urllib.error.HTTPError as exc:
        if exc.code < 500:  # it answered (an auth proxy, an older server without /health)
            return
        reason = f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = str(getattr(exc, "reason", exc))
    raise ConfigError(f"MLflow tracking server {uri} does not answer ({reason}): start it (mlflow server --host "
                      "127.0.0.1 --port <port> ...) or unset MLFLOW_TRACKING_URI to log to the local store mlflow.db")


def experiment_for(data: dict[str, Any] | None) -> str:
    return f"uad-{dataset_name(data)}"


class TrackingHook(MlflowHook):
    """kedro-mlflow's hook with readable runs, per-dataset experiments and aligned parameters."""

    def __init__(self) -> None:
        super().__init__()
        self._pending_setup: tuple[Any, Any] | None = None
        self._params: dict[str, Any] = {}
        self._env: str | None = None
        self._identity: dict[str, str] = {}
        self._catalog = None
        self._catalog_args: tuple | None = None

    def _record_setup(self, config: Any, context: Any) -> None:
        self._pending_setup = (config, context)

    @hook_impl
    def after_context_created(self, context) -> None:
        self._pending_setup = None
        self._env = context.env
        try:
            self._params = dict(context.params)
        except Exception:  # noqa: BLE001 - bad parameters are reported by the run itself
            self._params = {}
        with defer_mlflow_setup(self._record_setup):
            super().after_context_created(context)

    @hook_impl
    def after_catalog_created(self, catalog, conf_catalog, conf_creds, parameters, save_version, load_versions) -> None:
        # kedro-mlflow names its metric datasets here by materialising every catalog entry (every
        # dataset class imported): deferred to before_pipeline_run, and skipped when untracked
        self._catalog = catalog
        self._catalog_args = (catalog, conf_catalog, conf_creds, parameters, save_version, load_versions)

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        names = pipeline_names(run_params)
        data = self._params.get("data") or {}
        # the hook outlives a session (several runs in one process: notebooks, tests); an untracked
        # pipeline must not re-open the previous session's run in before_node_run
        self.run_id = None
        self._identity = run_identity(run_params, data, run_params.get("env") or self._env)
        if self._pending_setup is not None and mlflow_enabled_for(names, self.mlflow_config):
            config, context = self._pending_setup
            self._pending_setup = None
            check_server(str(config.server.mlflow_tracking_uri or ""))
            if config.tracking.experiment.name == PER_DATASET:
                config.tracking.experiment.name = experiment_for(data)
            config.setup(context)
        if self._catalog_args is not None and mlflow_enabled_for(names, self.mlflow_config):
            super().after_catalog_created(*self._catalog_args)
        self._catalog_args = None
        super().before_pipeline_run(run_params, pipeline, catalog)
        if hook_tracking(self) and mlflow.active_run() is not None:
            ident = self._identity
            tags = {"mlflow.runName": ident["name"], **{f"uad.{k}": v for k, v in ident.items() if k != "name"}}
            # a child of ``kedro run --pipeline=benchmark`` (uad.framework.pipelines.benchmark): nested under it
            if os.environ.get("UAD_PARENT_RUN_ID"):
                tags["mlflow.parentRunId"] = os.environ["UAD_PARENT_RUN_ID"]
            if os.environ.get("UAD_BENCHMARK_KEY"):
                tags["uad.benchmark_key"] = os.environ["UAD_BENCHMARK_KEY"]
            mlflow.set_tags(tags)
            _mark_model_training(mlflow.active_run().info.experiment_id)

    @hook_impl
    def before_node_run(self, node, catalog, inputs: dict[str, Any], is_async: bool) -> None:
        kept = {k: v for k, v in inputs.items()
                if k != "parameters" and (not k.startswith("params:") or k[len("params:"):] in RUN_BLOCKS)}
        super().before_node_run(node, catalog, kept, is_async)

    @hook_impl
    def after_node_run(self, node, catalog, inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
        if node.name != "split_for_setting" or not hook_tracking(self) or mlflow.active_run() is None:
            return
        try:
            self._log_dataset_input(outputs)
        except Exception as exc:  # noqa: BLE001 - bookkeeping must never fail a run
            log.warning("could not log the dataset input to MLflow: %s", exc)

    def _log_dataset_input(self, outputs: dict[str, Any]) -> None:
        import pandas as pd

        from uad.data.index import content_fingerprint

        frames = [outputs[k] for k in ("train_index", "test_index") if isinstance(outputs.get(k), pd.DataFrame)]
        if not frames:
            return
        index = pd.concat(frames, ignore_index=True)
        source = _catalog_file(self._catalog, "sample_index") or "sample_index"
        digest = content_fingerprint(index)[:16]
        with warnings.catch_warnings():  # MLflow's schema hint about integer columns: not a model schema here
            warnings.simplefilter("ignore", UserWarning)
            ds = mlflow.data.from_pandas(index[["dataset", "class_name", "split", "label", "defect_type"]],
                                         source=str(Path(source).resolve()), name=self._identity.get("dataset", "dataset"),
                                         digest=digest)
        mlflow.log_input(ds, context="training")
        mlflow.set_tag("uad.data_digest", digest)


def _mark_model_training(experiment_id: str) -> None:
    """MLflow 3's UI opens an experiment on its GenAI pages unless the experiment says it holds
    model training: tag it so (once), and the runs table is what a user sees first."""
    try:
        client = mlflow.tracking.MlflowClient()
        if "mlflow.experimentKind" not in client.get_experiment(experiment_id).tags:
            client.set_experiment_tag(experiment_id, "mlflow.experimentKind", "custom_model_development")
    except Exception as exc:  # noqa: BLE001 - presentation only
        log.debug("could not tag the experiment's kind: %s", exc)


def _catalog_file(catalog: Any, name: str) -> str | None:
    try:
        return dataset_file(catalog_dataset(catalog, name))
    except Exception:  # noqa: BLE001
        return None
