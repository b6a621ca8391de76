"""INP-Former++ (Luo et al.): intrinsic normal prototypes + residual learning for universal
anomaly detection."""

from .config import INPFormerConfig
from .method import INPFormer
from .model import INPExtractor, INPFormerModel, INPGuidedAttention, INPGuidedDecoderBlock, SegmentationHead, residual_features

__all__ = [
    "INPExtractor",
    "INPFormer",
    "INPFormerConfig",
    "INPFormerModel",
    "INPGuidedAttention",
    "INPGuidedDecoderBlock",
    "SegmentationHead",
    "residual_features",
]
