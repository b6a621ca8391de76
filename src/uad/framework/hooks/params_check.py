"""Parameter check (Kedro layer): a run's settings are checked before its first node runs."""

from __future__ import annotations

from kedro.framework.hooks import hook_impl


def _value(catalog, name: str):
    try:
        return catalog.load(name)
    except Exception:  # not a parameter of this run (a plain dataset of that name): nothing to check
        return None


class ParamsCheckHook:
    """Before anything runs, every engine and method block the run's nodes will read is checked
    the way those nodes check it (:func:`uad.engine.orchestration.check_method_params`): a bad
    ``--params`` value ends the run in one ``Error:`` line within seconds, not after ingestion and
    a model build, and opens no MLflow run."""

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self, run_params, pipeline, catalog) -> None:
        inputs = set(pipeline.inputs())
        if "params:engine" not in inputs:
            return
        namespaces = sorted({name[len("params:"):].rsplit(".", 1)[0] for name in inputs
                             if name.startswith("params:") and name.endswith((".method", ".engine_override"))})
        if not namespaces:
            return
        from uad.engine.orchestration import check_method_params

        engine = _value(catalog, "params:engine")
        for ns in namespaces:
            method = _value(catalog, f"params:{ns}.method") if f"params:{ns}.method" in inputs else None
            override = _value(catalog, f"params:{ns}.engine_override")
            check_method_params(ns, method, engine, override)
