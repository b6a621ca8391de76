"""Dinomaly (Guo et al., CVPR 2025): "less is more" multi-class unsupervised anomaly detection."""

from .config import DinomalyConfig
from .method import Dinomaly
from .model import DinomalyModel

__all__ = ["Dinomaly", "DinomalyConfig", "DinomalyModel"]
