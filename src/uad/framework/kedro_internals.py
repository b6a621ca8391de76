"""The fence: every use of a private name of Kedro or kedro-mlflow lives in this module, and only here.

The project starts fast and keeps MLflow out of runs that do not track (``kedro registry list``,
``kedro run --pipeline=ingest`` import neither torch nor mlflow). Kedro and kedro-mlflow offer no
public switch for three of the things that needs, so this module reaches into them:

1. **Plug-in commands imported on use** (:func:`init`, this package's ``kedro.init`` entry point):
   Kedro's ``load_entry_points("project")`` (``kedro.framework.cli.cli``) is wrapped so that
   kedro-mlflow's command group (whose module imports mlflow) is a :class:`LazyPluginCommands`
   stand-in, loaded with Kedro's ``_safe_load_entry_point`` when one of its commands is looked up;
   the entry points are listed with Kedro's ``_get_entry_points``.
2. **Disabled plug-in hooks never imported** (:func:`block_disabled_plugin_hooks`): Kedro imports
   a plug-in's hook module before unregistering it for ``DISABLE_HOOKS_FOR_PLUGINS``; its
   ``_register_hooks_entry_points`` is wrapped to block them by name first.
3. **kedro-mlflow's store opened only for tracked runs** (:func:`defer_mlflow_setup`):
   ``KedroMlflowConfig.setup`` is recorded instead of run while its hook reads the configuration;
   :func:`mlflow_enabled_for` (its ``_assert_mlflow_enabled``), :func:`hook_tracking`
   (``MlflowHook._is_mlflow_enabled``) and :func:`switch_off_mlflow_logging` (a kedro-mlflow
   dataset's ``_logging_activated``) read and set its state.
4. **Where a dataset wrote** (:func:`catalog_dataset`, :func:`dataset_file`, :func:`saved_path`):
   a dataset's ``_filepath`` (and ``_saved_version``, this project's own) and a kedro-mlflow
   wrapper's ``_dataset``.

:data:`PRIVATE_NAMES` lists each name with where it lives; ``tests/test_kedro_internals.py``
fails, naming the upstream change, when one disappears. ``pyproject.toml`` bounds kedro and
kedro-mlflow to the versions this was written for (kedro 1.x from 1.0, kedro-mlflow 1.x-2.x);
the project's own ``uad.framework.io`` datasets subclass ``AbstractVersionedDataset`` through the
hooks Kedro documents for custom datasets (``_describe``, ``_exists``, ``_get_load_path``,
``_get_save_path``, ``_filepath``, ``_version``), listed in :data:`DATASET_CONTRACT` and checked by
the same test.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import click

#: distribution (normalised) -> the top-level commands its ``kedro.project_commands`` group adds
LAZY_COMMANDS = {"kedro_mlflow": ("mlflow",)}


def norm_name(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


class LazyPluginCommands(click.Group):
    """A plug-in's command group, standing in for it until one of its commands is looked up."""

    def __init__(self, entry_point: Any, commands: tuple[str, ...]):
        super().__init__(name=entry_point.name)
        self._entry_point = entry_point
        self._names = tuple(commands)
        self._group: click.Group | None = None
        self._loaded = False

    def _load(self) -> click.Group | None:
        if not self._loaded:
            from kedro.framework.cli.utils import _safe_load_entry_point

            self._group = _safe_load_entry_point(self._entry_point)  # logs and skips a broken plug-in, as Kedro does
            self._loaded = True
        return self._group

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self._names)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self._names:
            return None
        group = self._load()
        return None if group is None else group.get_command(ctx, cmd_name)


def init() -> None:
    """``kedro.init`` entry point: wrap Kedro's loader of project commands (idempotent)."""
    from kedro.framework.cli import cli as kedro_cli
    from kedro.framework.cli import utils

    original = kedro_cli.load_entry_points
    if getattr(original, "_uad_lazy", False):
        return

    def load_entry_points(name: str):
        if name != "project":
            return original(name)
        groups = []
        for ep in utils._get_entry_points(name):
            dist = norm_name(ep.dist.name) if getattr(ep, "dist", None) is not None else ""
            if dist in LAZY_COMMANDS:
                groups.append(LazyPluginCommands(ep, LAZY_COMMANDS[dist]))
                continue
            loaded = utils._safe_load_entry_point(ep)
            if loaded:
                groups.append(loaded)
        return groups

    load_entry_points._uad_lazy = True  # type: ignore[attr-defined]
    kedro_cli.load_entry_points = load_entry_points


#: (module, attribute path, what uses it): every private Kedro / kedro-mlflow name this module touches
PRIVATE_NAMES = (
    ("kedro.framework.cli.cli", "load_entry_points", "init: wrapped for lazy plug-in commands"),
    ("kedro.framework.cli.utils", "_get_entry_points", "init: lists the project command entry points"),
    ("kedro.framework.cli.utils", "_safe_load_entry_point", "LazyPluginCommands: loads a plug-in's group"),
    ("kedro.framework.hooks.manager", "_register_hooks_entry_points", "block_disabled_plugin_hooks"),
    ("kedro.framework.session.session", "_register_hooks_entry_points", "block_disabled_plugin_hooks"),
    ("kedro_mlflow.config.kedro_mlflow_config", "KedroMlflowConfig.setup", "defer_mlflow_setup"),
    ("kedro_mlflow.framework.hooks.utils", "_assert_mlflow_enabled", "mlflow_enabled_for"),
    # ``Name()`` : an attribute an instance gets in ``__init__``
    ("kedro_mlflow.framework.hooks.mlflow_hook", "MlflowHook()._is_mlflow_enabled", "hook_tracking"),
    ("kedro_mlflow.io.metrics", "MlflowMetricsHistoryDataset()._logging_activated", "switch_off_mlflow_logging"),
    ("kedro_mlflow.io.metrics", "MlflowMetricDataset()._logging_activated", "switch_off_mlflow_logging"),
    ("kedro_mlflow.io.metrics", "MlflowMetricHistoryDataset()._logging_activated", "switch_off_mlflow_logging"),
)
#: the modules whose ``_register_hooks_entry_points`` is wrapped (those present in the installed Kedro)
HOOK_REGISTRY_MODULES = ("kedro.framework.hooks.manager", "kedro.framework.session.session",
                         "kedro.framework.session.service_session", "kedro.runner.task")
#: Kedro's documented custom-dataset hooks the project's datasets subclass (kedro.io.core.AbstractVersionedDataset)
DATASET_CONTRACT = ("_describe", "_exists", "_get_load_path", "_get_save_path")


def block_disabled_plugin_hooks() -> None:
    """Make ``DISABLE_HOOKS_FOR_PLUGINS`` block a plug-in's hook entry points instead of importing
    them and unregistering them afterwards, as Kedro does: kedro-mlflow's hook module imports
    mlflow (about a second here) in every session, tracked or not. Same result (the plug-ins'
    hooks are not registered), without the import. Idempotent; wraps the function in each Kedro
    module that imported it by name."""
    import importlib
    import importlib.metadata

    def blocking(original):
        if getattr(original, "_uad_blocking", False):
            return original

        def register(hook_manager, disabled_plugins):
            disabled = {norm_name(n) for n in disabled_plugins}
            for dist in importlib.metadata.distributions():
                if norm_name(str(dist.metadata["Name"] or "")) in disabled:
                    for ep in dist.entry_points:
                        if ep.group == "kedro.hooks":
                            hook_manager.set_blocked(ep.name)
            return original(hook_manager, disabled_plugins)

        register._uad_blocking = True  # type: ignore[attr-defined]
        return register

    for module in HOOK_REGISTRY_MODULES:
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        if hasattr(mod, "_register_hooks_entry_points"):
            mod._register_hooks_entry_points = blocking(mod._register_hooks_entry_points)



@contextlib.contextmanager
def defer_mlflow_setup(record: Callable[[Any, Any], None]) -> Iterator[None]:
    """While kedro-mlflow reads its configuration, ``record(config, context)`` its ``setup`` call
    instead of running it (setup opens, and creates, the tracking store)."""
    from kedro_mlflow.config.kedro_mlflow_config import KedroMlflowConfig

    original = KedroMlflowConfig.setup
    KedroMlflowConfig.setup = lambda config, context: record(config, context)  # type: ignore[method-assign]
    try:
        yield
    finally:
        KedroMlflowConfig.setup = original  # type: ignore[method-assign]


def mlflow_enabled_for(pipeline_names: list[str], mlflow_config: Any) -> bool:
    """kedro-mlflow's own rule: whether it tracks a run of these pipelines (``disable_tracking``)."""
    from kedro_mlflow.framework.hooks.utils import _assert_mlflow_enabled

    return bool(_assert_mlflow_enabled(pipeline_names, mlflow_config))


def hook_tracking(hook: Any) -> bool:
    """Whether kedro-mlflow's hook decided to track this run."""
    return bool(getattr(hook, "_is_mlflow_enabled", False))


def switch_off_mlflow_logging(dataset: Any) -> None:
    """A kedro-mlflow dataset that must not log (an untracked run's): left on, it would start an
    MLflow run of its own."""
    if hasattr(dataset, "_logging_activated"):
        dataset._logging_activated = False


def catalog_dataset(catalog: Any, name: str) -> Any:
    """The dataset object of catalog entry ``name`` (Kedro 1.x's public ``DataCatalog.get``)."""
    return catalog.get(name)


def dataset_file(dataset: Any) -> str | None:
    """The file a dataset (or the dataset a kedro-mlflow wrapper holds) reads and writes."""
    for obj in (dataset, getattr(dataset, "_dataset", None), getattr(dataset, "dataset", None)):
        path = getattr(obj, "_filepath", None)
        if path:
            return str(path)
    return None


def saved_path(dataset: Any) -> str | None:
    """Where a catalog dataset wrote its last save: the version folder of a versioned dataset
    (``<file>/<version>/``), the file otherwise (None when it has no file: MLflow tags, metrics)."""
    version = getattr(dataset, "_saved_version", None)
    path = getattr(dataset, "_filepath", None)
    if version and path:
        return f"{path}/{version}/"
    return dataset_file(dataset)
