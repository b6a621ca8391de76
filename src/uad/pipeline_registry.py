"""Project pipelines. Every method pipeline is the shared template under the method's namespace.

Building them imports no node code (``uad.pipelines.lazy``): torch, timm and the methods are
imported by the first node that needs them, so ``kedro registry list`` and the ingest pipeline
start without them.
"""

from __future__ import annotations

from kedro.pipeline import Pipeline

from uad.methods.registry import pipeline_shape
from uad.pipelines import benchmark, ingest, method, synthesis

#: methods with a Kedro pipeline (name == registry name == namespace == parameters key)
METHODS = ("patchcore", "dinomaly", "inpformer", "rlr", "agpnet")
#: CostFilter-AD over each trained base: pipeline / namespace / parameters key costfilter_<base>
COSTFILTER_BASES = METHODS


def register_pipelines() -> dict[str, Pipeline]:
    ing = ingest.create_pipeline()
    pipes: dict[str, Pipeline] = {"ingest": ing, "synthesis": ing + synthesis.create_pipeline()}
    for name in METHODS:
        pipes[name] = ing + method.create_pipeline(name)
    pipes["features"] = ing + sum((method.features_pipeline(m) for m in METHODS if pipeline_shape(m).feature_cache),
                                  Pipeline([]))
    pipes["evaluate"] = sum((method.evaluation_pipeline(m) for m in METHODS), Pipeline([]))
    # use a trained model: kedro run --pipeline=infer --namespaces=<method> (or infer_<method>)
    pipes["infer"] = sum((method.infer_pipeline(m) for m in METHODS), Pipeline([]))
    pipes["export"] = sum((method.export_pipeline(m) for m in METHODS), Pipeline([]))
    for m in METHODS:
        pipes[f"infer_{m}"] = method.infer_pipeline(m)
        pipes[f"export_{m}"] = method.export_pipeline(m)
    # CostFilter-AD over a trained base (kedro run --pipeline=<base> first): costfilter_<base>
    for b in COSTFILTER_BASES:
        ns = method.plugin_namespace("costfilter", b)
        pipes[ns] = ing + method.create_pipeline("costfilter", base=b)
        pipes[f"infer_{ns}"] = method.infer_pipeline("costfilter", base=b)
        pipes[f"export_{ns}"] = method.export_pipeline("costfilter", base=b)
        pipes["infer"] += pipes[f"infer_{ns}"]
        pipes["export"] += pipes[f"export_{ns}"]
        pipes["evaluate"] += method.evaluation_pipeline(ns)
    pipes["costfilter"] = pipes["costfilter_dinomaly"]  # the released code's base
    # the papers' main table: each method of params:benchmark as a child run, compared side by side
    pipes["benchmark"] = benchmark.create_pipeline()
    pipes["__default__"] = pipes["patchcore"]
    return pipes
