from kedro.pipeline import Pipeline, node

from uad.framework.pipelines.lazy import named

_NODES = "uad.framework.pipelines.ingest.nodes"


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        node(named(f"{_NODES}:build_sample_index", "build_sample_index"), {"data": "params:data"}, "sample_index",
             name="build_sample_index"),
        node(named(f"{_NODES}:split_for_setting", "split_for_setting"), {"index": "sample_index", "data": "params:data"},
             ["train_index", "validation_index", "test_index", "split_info"], name="split_for_setting"),
        node(named(f"{_NODES}:build_unlabelled_index", "build_unlabelled_index"),
             {"index": "sample_index", "data": "params:data"}, "unlabelled_index", name="build_unlabelled_index"),
    ])
