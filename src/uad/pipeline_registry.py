"""Project pipelines (Kedro's entry point; thin). Every method pipeline is the shared template under
the method's namespace, one per declared method and one per plug-in pairing
(:mod:`uad.methods.declaration`: no list of methods is kept here).

Building them imports no node code (``uad.framework.pipelines.lazy``): torch, timm and the methods
are imported by the first node that needs them, so ``kedro registry list`` and the ingest pipeline
start without them.
"""

from __future__ import annotations

from kedro.pipeline import Pipeline

from uad.framework.pipelines import benchmark, ingest, method, submission, synthesis
from uad.methods.declaration import base_methods, declarations, plugin_namespace, plugins

#: the pipeline ``kedro run`` runs without ``--pipeline``
DEFAULT_PIPELINE = "patchcore"


def register_pipelines() -> dict[str, Pipeline]:
    ing = ingest.create_pipeline()
    pipes: dict[str, Pipeline] = {"ingest": ing, "synthesis": ing + synthesis.create_pipeline()}
    methods = base_methods()
    for name in methods:
        pipes[name] = ing + method.create_pipeline(name)
    pipes["features"] = ing + sum((method.features_pipeline(m) for m in methods if declarations()[m].features_stage),
                                  Pipeline([]))
    pipes["evaluate"] = sum((method.evaluation_pipeline(m) for m in methods), Pipeline([]))
    # use a trained model: kedro run --pipeline=infer --namespaces=<method> (or infer_<method>)
    pipes["infer"] = sum((method.infer_pipeline(m) for m in methods), Pipeline([]))
    pipes["export"] = sum((method.export_pipeline(m) for m in methods), Pipeline([]))
    # MVTec AD 2's evaluation-server folders: kedro run --pipeline=submission --namespaces=<method>
    pipes["submission"] = sum((submission.create_pipeline(m) for m in methods), Pipeline([]))
    for m in methods:
        pipes[f"infer_{m}"] = method.infer_pipeline(m)
        pipes[f"export_{m}"] = method.export_pipeline(m)
        pipes[f"submission_{m}"] = submission.create_pipeline(m)
    # a plug-in over each trained base it reads (kedro run --pipeline=<base> first): <plugin>_<base>
    for plugin, bases in plugins().items():
        for b in bases:
            ns = plugin_namespace(plugin, b)
            pipes[ns] = ing + method.create_pipeline(plugin, base=b)
            pipes[f"infer_{ns}"] = method.infer_pipeline(plugin, base=b)
            pipes[f"export_{ns}"] = method.export_pipeline(plugin, base=b)
            pipes[f"submission_{ns}"] = submission.create_pipeline(plugin, base=b)
            pipes["submission"] += pipes[f"submission_{ns}"]
            pipes["infer"] += pipes[f"infer_{ns}"]
            pipes["export"] += pipes[f"export_{ns}"]
            pipes["evaluate"] += method.evaluation_pipeline(ns)
        default = declarations()[plugin].default_base
        if default in bases:
            pipes[plugin] = pipes[plugin_namespace(plugin, default)]  # --pipeline=costfilter: its default base
    # the papers' main table: each method of params:benchmark as a child run, compared side by side
    pipes["benchmark"] = benchmark.create_pipeline()
    pipes["__default__"] = pipes[DEFAULT_PIPELINE]
    return pipes
