from .pipeline import (
    create_pipeline,
    evaluation_pipeline,
    export_pipeline,
    features_pipeline,
    infer_pipeline,
    plugin_namespace,
)

__all__ = ["create_pipeline", "evaluation_pipeline", "export_pipeline", "features_pipeline", "infer_pipeline",
           "plugin_namespace"]
