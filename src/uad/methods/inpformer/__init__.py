"""INP-Former++ (Luo et al.): intrinsic normal prototypes + residual learning for universal
anomaly detection.

Importing this package imports no torch: ``declaration.py`` describes the method to the rest of the
project, and the names below are loaded from their modules on first use.
"""

from uad.exports import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    ".config": ("INPFormerConfig",),
    ".method": ("INPFormer",),
    ".model": ("INPExtractor", "INPFormerModel", "INPGuidedAttention", "INPGuidedDecoderBlock", "SegmentationHead",
               "residual_features"),
})
