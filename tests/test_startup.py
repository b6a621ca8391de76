"""Commands start without torch: building the pipelines imports no node code and no method."""

from __future__ import annotations

import subprocess
import sys


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sorted(sys.modules)))"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return set(out.stdout.split())


def test_registering_every_pipeline_imports_neither_torch_nor_mlflow_nor_a_method():
    mods = _modules_after("import uad.pipeline_registry as r\npipes = r.register_pipelines()\nassert len(pipes) > 30")
    assert not {"torch", "mlflow", "timm"} & mods
    # the method folders' declarations (and their lazy packages), never a method's code
    light = {"uad.methods", "uad.methods.registry", "uad.methods.declaration"}
    heavy = sorted(m for m in mods if m.startswith("uad.methods.") and m not in light
                   and not m.endswith(".declaration") and m.count(".") != 2)
    assert not heavy, heavy
    assert "uad.methods.dinomaly.declaration" in mods


def test_project_settings_and_ingest_nodes_import_no_torch():
    mods = _modules_after("import uad.settings, uad.framework.pipelines.ingest.nodes, uad.framework.io")
    assert "torch" not in mods


def test_declarations_match_the_method_classes():
    """What each method's declaration.py says (the pipelines are laid out from it) equals what its
    class does: stages, pseudo-anomaly stages and recipes, features stage, plug-in features stage."""
    from uad.methods.capabilities import FeatureFitting, ReferencePool
    from uad.methods.declaration import declarations
    from uad.methods.registry import method_class, pipeline_shape, plugin_feature_cache

    decls = declarations()
    assert {"patchcore", "dinomaly", "inpformer", "rlr", "agpnet", "costfilter"} <= set(decls)
    for name, d in decls.items():
        cls = method_class(name)
        shape = pipeline_shape(name)
        assert shape.stages == tuple(cls.stages), name
        assert shape.feature_cache == issubclass(cls, FeatureFitting), name
        assert shape.synthesis == bool(cls.synthesis_stages()), name
        assert all(cls.wants_synthesis(s) == (s in d.synthesis) for s in cls.stages), name
    assert method_class("inpformer").synthesis_stages() == {"residual": "draem"}
    assert method_class("costfilter").synthesis_stages() == {"filter": "glad"}
    assert issubclass(method_class("costfilter"), ReferencePool)
    assert {b for b in decls if plugin_feature_cache("costfilter", b)} == {"patchcore"}


def test_lazy_node_runs_its_target_with_the_bound_arguments():
    from uad.framework.pipelines.lazy import named

    add = named("operator:add", "add")
    import pytest

    with pytest.raises(TypeError):
        add(a=1, b=2)  # operator.add takes no keywords: the target's own error comes through
    fmt = named("builtins:dict", "as_dict", method_name="m")
    assert fmt.__name__ == "as_dict"
    assert fmt(stage="s") == {"method_name": "m", "stage": "s"}


def _kedro_modules(project, *args: str) -> tuple[set[str], str]:
    """The modules a ``kedro <args>`` command in ``project`` imported by its end, and its output."""
    import os

    code = ("import atexit, sys\n"
            "atexit.register(lambda: print('MODULES', ' '.join(sorted(sys.modules))))\n"
            "from kedro.framework.cli.cli import main\n"
            f"sys.argv = ['kedro', *{list(args)!r}]\n"
            "main()\n")
    env = dict(os.environ, KEDRO_DISABLE_TELEMETRY="1", DO_NOT_TRACK="1", MLFLOW_TRACKING_URI=f"sqlite:///{project}/m.db")
    out = subprocess.run([sys.executable, "-c", code], cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("MODULES "))
    return set(line.split()[1:]), out.stdout + out.stderr


def test_registry_list_and_ingest_import_neither_mlflow_nor_torch_and_mlflow_commands_still_load(tmp_path):
    """kedro-mlflow's command group (uad.framework.kedro_internals) and hook (uad.framework.hooks.LazyTrackingHook,
    block_disabled_plugin_hooks) are imported only when a command or a tracked run needs them."""
    from kedro_harness import make_project_copy

    project = make_project_copy(tmp_path / "p")
    mods, out = _kedro_modules(project, "registry", "list")
    assert "inpformer" in out and not {"mlflow", "torch", "kedro_mlflow"} & mods, sorted({"mlflow", "torch"} & mods)
    mods, out = _kedro_modules(project, "run", "--pipeline=ingest", "--env=smoke")
    assert (project / "data/02_intermediate/train_index.csv").is_file()
    assert not {"mlflow", "torch"} & mods and not any(m.startswith("kedro_mlflow") for m in mods)
    mods, out = _kedro_modules(project, "mlflow", "--help")
    assert "Use mlflow-specific commands" in out and "kedro_mlflow.framework.cli.cli" in mods


def test_an_untracked_run_switches_its_mlflow_datasets_off(tmp_path):
    """A pipeline listed under disable_tracking.pipelines with kedro-mlflow metric datasets: they
    are built and switched off (left on, the first metric would open an MLflow run by itself);
    other datasets are not built."""
    from kedro.io import DataCatalog
    from kedro.pipeline import Pipeline, node

    from uad.framework.hooks.lazy_tracking import _switch_off_mlflow_datasets

    catalog = DataCatalog.from_config({
        "m": {"type": "kedro_mlflow.io.metrics.MlflowMetricsHistoryDataset"},
        "t": {"type": "uad.framework.io.CsvTableDataset", "filepath": "/nonexistent/t.csv"},
    })
    pipe = Pipeline([node(lambda t: t, "t", "m", name="n")])
    _switch_off_mlflow_datasets(pipe, catalog)
    # switched off, saving a metric opens no MLflow run (left on, it would start one of its own)
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    catalog["m"].save({"loss": [{"step": 0, "value": 1.0}]})
    assert mlflow.active_run() is None
