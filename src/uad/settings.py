"""Kedro project settings (Kedro's entry point; the hooks live in :mod:`uad.framework.hooks`).

Telemetry: kedro-telemetry is switched off for this project by the committed ``.telemetry``
file (``consent: false``) and its project hooks are disabled here, so Kedro never prompts and
never reaches for the network.
"""

import logging
import warnings

from omegaconf.resolvers import oc

from kedro.config import OmegaConfigLoader

from uad.framework.hooks import (
    DEFAULT_RUN_ENV,
    LazyTrackingHook,
    NodeTimesHook,
    ParamsCheckHook,
    ProjectLockHook,
    RankZeroWritesHook,
    RunSummaryHook,
    RunTagsHook,
)
from uad.framework.kedro_internals import block_disabled_plugin_hooks

# OmegaConf 2.4 deprecates the resolver API that Kedro and kedro-mlflow still call; the warning is
# theirs to fix and only buries the run's own log lines.
warnings.filterwarnings("ignore", message=r"register_new_resolver\(\) is deprecated", category=UserWarning)
# Namespaced pipelines name their datasets ``<method>.<name>`` by design (Kedro's namespaces do).
warnings.filterwarnings("ignore", message=r"One or more dataset names contain '\.' characters", category=UserWarning)


class _DropKnownLibraryWarning(logging.Filter):
    """kedro-mlflow's pipeline model class has an un-annotated ``predict``; MLflow warns about it
    when the class is defined, inside its own ``catch_warnings`` (so no warnings filter reaches
    it). Kedro routes warnings through the ``py.warnings`` logger: drop that one record there."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Add type hints to the `predict` method" not in record.getMessage()


logging.getLogger("py.warnings").addFilter(_DropKnownLibraryWarning())


def _plain_logs_off_terminal() -> None:
    """Off a terminal (CI, ``> run.log``), rich lays every line out in 80 columns and wraps it;
    there the rich handler on the root logger becomes a plain one: one line per record, the
    whole message, nothing wrapped."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        console = getattr(handler, "console", None)
        if console is None or console.is_terminal or console.is_jupyter:
            continue
        plain = logging.StreamHandler(console.file)
        plain.setLevel(handler.level)
        plain.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"))
        for f in handler.filters:
            plain.addFilter(f)
        root.removeHandler(handler)
        root.addHandler(plain)


_plain_logs_off_terminal()

# pluggy calls hooks registered later first: the node times, then the summary, are the last lines
# LazyTrackingHook loads uad.framework.hooks.tracking.TrackingHook, kedro-mlflow's hook with readable run names,
# per-dataset experiments and un-namespaced parameters, for tracked runs only (no mlflow import
# otherwise); the plug-in's own instance is disabled for it (uad.cli: without importing it).
block_disabled_plugin_hooks()  # DISABLE_HOOKS_FOR_PLUGINS below: blocked, never imported

HOOKS = (LazyTrackingHook(), ProjectLockHook(), ParamsCheckHook(), RunTagsHook(), RankZeroWritesHook(), RunSummaryHook(),
         NodeTimesHook())

DISABLE_HOOKS_FOR_PLUGINS = ("kedro-telemetry", "kedro_mlflow")

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    # `kedro run` with no --env runs the quick profile (conf/quick); --env=mvtec etc. run the
    # papers' settings, since conf/base keeps every method at its code (= paper) defaults.
    "default_run_env": DEFAULT_RUN_ENV,
    # ``${oc.env:VAR,default}`` everywhere: MLFLOW_TRACKING_URI switches the tracking server
    # without code changes, and dataset roots can come from the environment.
    "custom_resolvers": {"oc.env": oc.env},
    # Environments override single keys (deep merge), e.g. conf/smoke only shrinks the scale.
    "merge_strategy": {"parameters": "soft", "catalog": "soft", "mlflow": "soft"},
    "config_patterns": {
        "parameters": ["parameters*", "parameters*/**", "**/parameters*"],
        "mlflow": ["mlflow*", "mlflow*/**", "**/mlflow*"],
    },
}
