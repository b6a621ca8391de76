"""Pieces shared by the ViT feature-reconstruction methods (Dinomaly, INP-Former++).

Blocks (Dinomaly eq. 2-3), the noisy bottleneck, layer-group fusion (Loose Constraint), the
loose loss (eq. 4-6), StableAdamW + warm-up cosine schedule, map/score functions, and the
:class:`ViTReconstructionMethod` skeleton both methods subclass.
"""

from .blocks import DecoderBlock, LinearAttention, Mlp, SoftmaxAttention, make_attention
from .bottleneck import BottleneckMLP
from .groups import fuse_groups, make_groups, resolve_groups
from .losses import global_cosine_hm_loss, global_cosine_loss, hard_mining_mask, hard_mining_ratio, shrink_gradient
from .optim import StableAdamW, WarmCosineSchedule, warm_cosine_lr
from .recon import (
    Encoded,
    ReconConfig,
    ViTReconstructionMethod,
    backbone_depth,
    default_layers,
    init_trunc_normal,
)
from .scoring import (
    anomaly_map_from_pairs,
    cosine_distance_maps,
    gaussian_blur,
    gaussian_kernel1d,
    topk_mean_score,
    upsample_and_smooth,
)

__all__ = [
    "BottleneckMLP",
    "DecoderBlock",
    "Encoded",
    "LinearAttention",
    "Mlp",
    "ReconConfig",
    "SoftmaxAttention",
    "StableAdamW",
    "ViTReconstructionMethod",
    "WarmCosineSchedule",
    "anomaly_map_from_pairs",
    "backbone_depth",
    "cosine_distance_maps",
    "default_layers",
    "fuse_groups",
    "gaussian_blur",
    "gaussian_kernel1d",
    "global_cosine_hm_loss",
    "global_cosine_loss",
    "hard_mining_mask",
    "hard_mining_ratio",
    "init_trunc_normal",
    "make_attention",
    "make_groups",
    "resolve_groups",
    "shrink_gradient",
    "topk_mean_score",
    "upsample_and_smooth",
    "warm_cosine_lr",
]
