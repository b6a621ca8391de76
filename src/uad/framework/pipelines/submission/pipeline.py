"""``kedro run --pipeline=submission --namespaces=<method>``: MVTec AD 2's two private test sets
scored by the method's trained checkpoint and written as the evaluation server's folders."""

from __future__ import annotations

from kedro.pipeline import Pipeline, node

from uad.framework.pipelines.lazy import named
from uad.framework.pipelines.method.pipeline import _compose_nodes, _final_checkpoint, _params_input
from uad.methods.declaration import plugin_namespace

_NODES = "uad.framework.pipelines.submission.nodes"


def create_pipeline(method: str, base: str | None = None) -> Pipeline:
    namespace = method if base is None else plugin_namespace(method, base)
    nodes = [*_compose_nodes(method, base),
             node(named(f"{_NODES}:write_submission", "submission", method_name=method, namespace=namespace),
                  {"images": "unlabelled_index", "method_params": _params_input(base), "engine": "params:engine",
                   "engine_override": "params:engine_override", "checkpoint": _final_checkpoint(method),
                   "thresholds": "thresholds", "infer": "params:infer", "submission": "params:submission"},
                  "submission_tags", name="submission", tags=["submission"])]
    params = {"params:infer", "params:engine", "params:submission"} | ({f"params:{base}.method"} if base else set())
    return Pipeline(nodes, namespace=namespace, inputs={"unlabelled_index"}, parameters=params)
