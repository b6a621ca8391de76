"""Dinomaly (Guo et al., CVPR 2025): "less is more" multi-class unsupervised anomaly detection.

Importing this package imports no torch: ``declaration.py`` describes the method to the rest of the
project, and the names below are loaded from their modules on first use.
"""

from uad.exports import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    ".method": ("Dinomaly",),
    ".config": ("DinomalyConfig",),
    ".model": ("DinomalyModel",),
})
