from .pipeline import create_pipeline, evaluation_pipeline, features_pipeline

__all__ = ["create_pipeline", "evaluation_pipeline", "features_pipeline"]
