from kedro.pipeline import Pipeline, node

from .nodes import build_sample_index, split_for_setting


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        node(build_sample_index, "params:data", "sample_index", name="build_sample_index"),
        node(split_for_setting, ["sample_index", "params:data"], ["train_index", "test_index", "split_info"],
             name="split_for_setting"),
    ])
