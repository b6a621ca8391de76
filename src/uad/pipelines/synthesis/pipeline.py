from kedro.pipeline import Pipeline, node

from .nodes import synthesis_preview


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        node(synthesis_preview, ["train_index", "params:synthesis"], ["synthesis_preview", "synthesis_run_tags"],
             name="synthesis_preview", tags=["synthesis"]),
    ])
