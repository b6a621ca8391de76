"""Kedro catalog datasets of this project (Kedro layer: may import kedro and mlflow)."""

from .datasets import (
    CsvTableDataset,
    FileFolderDataset,
    HtmlDataset,
    JSONTagsDataset,
    MlflowTagsDataset,
    NpzDataset,
    OnnxModelDataset,
    ServedModelDataset,
    PngDataset,
    PngFolderDataset,
    SafetensorsDataset,
    ThresholdsDataset,
)

__all__ = ["CsvTableDataset", "FileFolderDataset", "HtmlDataset", "JSONTagsDataset", "MlflowTagsDataset", "NpzDataset", "OnnxModelDataset", "PngDataset", "ServedModelDataset",
           "PngFolderDataset", "SafetensorsDataset", "ThresholdsDataset"]
