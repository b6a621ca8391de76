"""Kedro catalog datasets of this project (Kedro layer: may import kedro and mlflow)."""

from .datasets import JSONTagsDataset, MlflowTagsDataset, NpzDataset, PngDataset, SafetensorsDataset

__all__ = ["JSONTagsDataset", "MlflowTagsDataset", "NpzDataset", "PngDataset", "SafetensorsDataset"]
