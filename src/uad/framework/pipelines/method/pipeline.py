"""One train -> predict -> evaluate -> report template, instantiated per method by namespace.

``create_pipeline("dinomaly")`` and ``create_pipeline("inpformer")`` are the same nodes under two
namespaces; they differ only in their parameters (``params:<method>.method``) and in the stages the
method declares (``AnomalyMethod.stages``: one ``train_<stage>`` node per stage, each taking the
previous stage's saved checkpoint, so any stage can be re-run alone with ``--from-nodes``).
"""

from __future__ import annotations

from kedro.pipeline import Pipeline, node

from uad.methods.declaration import plugin_namespace
from uad.methods.registry import pipeline_shape, plugin_feature_cache
from uad.framework.pipelines.lazy import named

# node functions by path: building the pipelines imports neither torch nor any method
_NODES = "uad.framework.pipelines.method.nodes"
_SERVING = "uad.framework.pipelines.method.serving"
_SYNTHESIS = "uad.framework.pipelines.synthesis.nodes"

SHARED_INPUTS = {"train_index", "validation_index", "test_index"}
SHARED_PARAMS = {"params:data", "params:engine", "params:synthesis", "params:evaluation", "params:reporting", "params:infer"}


def _base_checkpoint(base: str) -> str:
    return f"{base}.checkpoint_{pipeline_shape(base).stages[-1]}"


def _namespaced(nodes: list, namespace: str, base: str | None = None) -> Pipeline:
    """``nodes`` under the namespace; shared datasets/parameters keep their names, and so do a
    plug-in's base checkpoint and parameters (the base's own namespace)."""
    used = {i for n in nodes for i in n.inputs}
    inputs = SHARED_INPUTS & used
    params = SHARED_PARAMS & used
    if base is not None:
        inputs |= {_base_checkpoint(base)} & used
        params |= {f"params:{base}.method"} & used
    return Pipeline(nodes, namespace=namespace, inputs=inputs, parameters=params)


def _params_input(base: str | None) -> str:
    """Where the nodes read the method's parameters: its block, or, for a plug-in, the block
    composed with the base's (node ``compose_params``)."""
    return "params:method" if base is None else "method_params"


def _compose_nodes(method: str, base: str | None) -> list:
    if base is None:
        return []
    return [node(named(f"{_NODES}:compose_plugin_params", "compose_params", base_name=base),
                 {"method_params": "params:method", "base_params": f"params:{base}.method"}, "method_params",
                 name="compose_params", tags=["train", "predict", "infer", "export"])]


def _common(method: str, base: str | None = None) -> dict[str, str]:
    return {"data": "params:data", "method_params": _params_input(base), "engine": "params:engine",
            "engine_override": "params:engine_override"}


def _features_nodes(method: str, base: str | None = None) -> list:
    """The features stage: frozen-encoder features of the clean normal training images, computed
    once (PatchCore's patches; CostFilter-AD over an embedding base: its reference pool)."""
    inputs = {"train_index": "train_index", **_common(method, base)}
    if base is not None:
        inputs["base"] = _base_checkpoint(base)
    return [node(named(f"{_NODES}:extract_features", "extract_features", method_name=method), inputs,
                 "train_features", name="extract_features", tags=["features", "train"])]


def _caches_features(method: str, base: str | None) -> bool:
    return pipeline_shape(method).feature_cache or (base is not None and plugin_feature_cache(method, base))


def _synthesis_nodes(method: str) -> list:
    """The synthesis stage: the spec of the pseudo anomalies (recipe, parameters, textures with
    digests) that every training stage of the method consumes, and its preview grid."""
    return [node(named(f"{_SYNTHESIS}:synthesis_spec", "synthesis_spec", method_name=method),
                 {"train_index": "train_index", "data": "params:data", "synthesis": "params:synthesis",
                  "engine": "params:engine", "engine_override": "params:engine_override"},
                 ["synthesis_spec", "synthesis_preview", "synthesis_tags"], name="synthesis", tags=["synthesis", "train"])]


def _training_nodes(method: str, base: str | None = None) -> list:
    shape = pipeline_shape(method)
    nodes, previous = [], None
    features = _caches_features(method, base)
    if features:
        nodes += _features_nodes(method, base)
    if shape.synthesis:
        nodes += _synthesis_nodes(method)
    for stage in shape.stages:
        inputs = {"train_index": "train_index", **_common(method, base)}
        if shape.synthesis:  # every stage reads the spec: a bad texture folder fails before the first (long) stage
            inputs["synthesis"] = "synthesis_spec"
            inputs["synthesis_params"] = "params:synthesis"  # a kept spec (--from-nodes) must match them
        if previous is not None:
            inputs["previous"] = previous
        elif base is not None:
            inputs["base"] = _base_checkpoint(base)
        if features:
            inputs["features"] = "train_features"
        if base is not None and stage == shape.stages[-1]:
            # a plug-in may fit its output on the held-out normals after training (CostFilter-AD's
            # calibrated blend); the test split is never a training input
            inputs["validation_index"] = "validation_index"
        label = "train" if stage == "train" else f"train_{stage}"
        nodes.append(node(named(f"{_NODES}:train_stage", label, method_name=method, stage=stage), inputs,
                          [f"checkpoint_{stage}", f"train_log_{stage}", f"run_tags_{stage}"],
                          name=label, tags=["train"]))
        previous = f"checkpoint_{stage}"
    return nodes, previous


def _evaluation_nodes(method: str) -> list:
    return [
        node(named(f"{_NODES}:evaluate", "evaluate"), {"predictions": "predictions", "evaluation": "params:evaluation"},
             ["metrics_table", "mlflow_metrics", "thresholds"], name="evaluate", tags=["evaluate"]),
        node(named(f"{_NODES}:report", "report", method_name=method),
             {"predictions": "predictions", "metrics_table": "metrics_table", "reporting": "params:reporting",
              "thresholds": "thresholds", "data": "params:data"},
             ["overlays", "curves", "per_class_chart", "report_html"], name="report", tags=["evaluate", "report"]),
    ]


def create_pipeline(method: str, base: str | None = None) -> Pipeline:
    """The template for ``method``; with ``base``, the plug-in ``method`` (CostFilter-AD) over the
    trained ``base`` (its checkpoint read from the catalog), namespace ``<method>_<base>``."""
    train, final = _training_nodes(method, base)
    pred = node(named(f"{_NODES}:predict", "predict", method_name=method),
                {"test_index": "test_index", "validation_index": "validation_index", **_common(method, base),
                 "checkpoint": final, "infer": "params:infer",
                 "evaluation": "params:evaluation"},
                "predictions", name="predict", tags=["predict"])
    namespace = method if base is None else plugin_namespace(method, base)
    return _namespaced([*_compose_nodes(method, base), *train, pred, *_evaluation_nodes(method)], namespace, base)


def _final_checkpoint(method: str) -> str:
    return f"checkpoint_{pipeline_shape(method).stages[-1]}"


def infer_pipeline(method: str, base: str | None = None) -> Pipeline:
    """Score a folder of new images with the method's trained checkpoint and stored thresholds."""
    common = {"method_params": _params_input(base), "engine": "params:engine", "engine_override": "params:engine_override"}
    nodes = [
        *_compose_nodes(method, base),
        node(named(f"{_SERVING}:scan_images", "scan_images"), {"infer": "params:infer"}, "infer_index", name="scan_images", tags=["infer"]),
        node(named(f"{_SERVING}:infer_images", "infer", method_name=method),
             {"images": "infer_index", **common, "checkpoint": _final_checkpoint(method), "thresholds": "thresholds",
              "infer": "params:infer"},
             ["infer_results", "infer_maps", "infer_overlays", "infer_tags"], name="infer", tags=["infer"]),
    ]
    return _served(nodes, method, base, {"params:infer", "params:engine"})


def _served(nodes: list, method: str, base: str | None, shared: set[str], inputs: set[str] = frozenset()) -> Pipeline:
    namespace = method if base is None else plugin_namespace(method, base)
    params = shared | ({f"params:{base}.method"} if base is not None else set())
    return Pipeline(nodes, namespace=namespace, parameters=params, inputs=set(inputs) or None)


def export_pipeline(method: str, base: str | None = None) -> Pipeline:
    """The method's inference path as an ONNX model (+ preprocessing / thresholds JSON), as the
    servable MLflow pyfunc registered in the model registry (``uad-<namespace>``), and the
    deployable formats of ``export.formats`` (INT8 calibrated on the shared ``train_index``)."""
    nodes = [*_compose_nodes(method, base),
             node(named(f"{_SERVING}:export_model", "export", method_name=method),
                  {"method_params": _params_input(base), "checkpoint": _final_checkpoint(method),
                   "thresholds": "thresholds", "export": "params:export", "metrics_table": "metrics_table",
                   "train_index": "train_index"},
                  ["onnx_model", "export_spec", "served_model", "export_tags", "deploy_models"], name="export",
                  tags=["export"])]
    return _served(nodes, method, base, {"params:export"}, inputs={"train_index"})


def evaluation_pipeline(method: str) -> Pipeline:
    """Only the shared evaluation + report nodes of ``method`` (re-evaluate saved predictions)."""
    return _namespaced(_evaluation_nodes(method), method)


def features_pipeline(method: str) -> Pipeline:
    """Frozen-encoder feature caching for a method that never perturbs its input."""
    return _namespaced(_features_nodes(method), method)
