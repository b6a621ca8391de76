"""``kedro run --pipeline=benchmark``: every method of ``params:benchmark`` as a child run, then the
comparison (see :mod:`uad.framework.pipelines.benchmark.nodes`)."""

from kedro.pipeline import Pipeline, node

from uad.framework.pipelines.lazy import named


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        node(named("uad.framework.pipelines.benchmark.nodes:run_benchmark", "run_benchmark"),
             {"benchmark": "params:benchmark", "parameters": "parameters"},
             ["benchmark_per_class", "benchmark_table", "benchmark_heatmap", "benchmark_tags"],
             name="run_benchmark", tags=["benchmark"]),
    ])
