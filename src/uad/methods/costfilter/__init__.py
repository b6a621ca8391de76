"""CostFilter-AD: matching-cost filtering over any trained base detector (see :mod:`.method`).

Importing this package imports no torch: ``declaration.py`` describes the method to the rest of the
project, and the names below are loaded from their modules on first use.
"""

from uad.exports import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    ".bases": ("BaseView", "EmbeddingBase", "FilterBase", "ReconstructionBase", "make_base"),
    ".config": ("PRESETS", "CostFilterConfig"),
    ".losses": ("costfilter_loss", "focal_gamma", "focal_loss", "soft_iou_loss", "ssim_loss"),
    ".method": ("CostFilter",),
    ".network": ("CostFilterNet", "convert_official_state_dict"),
    ".volume": ("aligned_distance_map", "build_volume", "cost_matrix", "select_matching"),
})
