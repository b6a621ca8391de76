from kedro.pipeline import Pipeline, node

from uad.framework.pipelines.lazy import named


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        node(named("uad.framework.pipelines.synthesis.nodes:synthesis_preview", "synthesis_preview"), {"train_index": "train_index", "synthesis": "params:synthesis"}, ["synthesis_preview", "synthesis_run_tags"],
             name="synthesis_preview", tags=["synthesis"]),
    ])
