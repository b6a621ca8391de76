"""CostFilter-AD: matching-cost filtering over any trained base detector (see :mod:`.method`)."""

from .bases import BaseView, EmbeddingBase, FilterBase, ReconstructionBase, make_base
from .config import PRESETS, CostFilterConfig
from .losses import costfilter_loss, focal_gamma, focal_loss, soft_iou_loss, ssim_loss
from .method import CostFilter
from .network import CostFilterNet, convert_official_state_dict
from .volume import aligned_distance_map, build_volume, cost_matrix, select_matching

__all__ = [
    "PRESETS", "BaseView", "CostFilter", "CostFilterConfig", "CostFilterNet", "EmbeddingBase", "FilterBase",
    "ReconstructionBase", "aligned_distance_map", "build_volume", "convert_official_state_dict", "cost_matrix",
    "costfilter_loss", "focal_gamma", "focal_loss", "make_base", "select_matching", "soft_iou_loss", "ssim_loss",
]
