"""Dinomaly's settings, defaults = the paper (section 4.1 and Appendix B, multi-class MVTec/VisA).

Ablation switches of Table 3 (NB / LA / LC / LL):

* ``noisy_bottleneck`` (NB): ``False`` turns the bottleneck dropout off.
* ``attention`` (LA): ``"linear"`` (default) or ``"softmax"``.
* ``groups`` (LC): ``2`` (default, Fig. 4e), ``1`` (Fig. 4d) or ``"dense"`` (layer-to-layer,
  Fig. 4c: the baseline without Loose Constraint); explicit lists of positions are accepted too.
* ``loose_loss`` (LL): ``False`` is the baseline's plain global cosine loss (no hard mining).

The Table 3 baseline is therefore ``noisy_bottleneck=False, attention=softmax, groups=dense,
loose_loss=False``. Other paper settings are parameters: Real-IAD uses ``bottleneck_dropout=0.4``
and ``iterations=50000``; the class-separated setting ``iterations=5000, hm_warmup_iters=500``;
ViT-S / ViT-L via ``backbone`` (``layers`` follow the depth: [2..9] or [4, 6, ..., 18]).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from uad.errors import ConfigError

from ..common.recon import ReconConfig

__all__ = ["DinomalyConfig"]

ATTENTIONS = ("linear", "softmax")


@dataclass
class DinomalyConfig(ReconConfig):
    """All Dinomaly parameters; unknown keys in :meth:`from_params` raise a ValueError."""

    # encoder (shared fields, paper defaults): backbone dinov2_vitb14_reg, layers from depth,
    # 2 groups, resize 448 / crop 392, Gaussian sigma 4, top 1% score, StableAdamW lr 2e-3 ...
    # decoder
    decoder_depth: int = 8
    num_heads: int | None = None  # None: embed_dim // 64 (6 / 12 / 16 for ViT-S / B / L)
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    attention: str = "linear"
    ln_eps: float = 1e-8
    decoder_prefix_tokens: bool = True  # class + register tokens go through bottleneck and decoder
    # Noisy Bottleneck
    noisy_bottleneck: bool = True
    bottleneck_dropout: float = 0.2
    bottleneck_ratio: float = 4.0
    # Loose Loss (global cosine with hard mining, eq. 4-5)
    loose_loss: bool = True
    hm_final: float = 0.9
    hm_warmup_iters: int = 1000
    # class-separated setting (one model per class, Appendix B): 5,000 iterations, 500-iteration
    # ramp; applied by ``Dinomaly.adapt_to_setting`` unless iterations / ramp are set explicitly
    class_separated_iterations: int = 5000
    class_separated_hm_warmup_iters: int = 500
    hm_shrink: float = 0.1

    method_label: ClassVar[str] = "dinomaly"

    def __post_init__(self) -> None:
        if self.attention not in ATTENTIONS:
            raise ConfigError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if not 0.0 <= self.bottleneck_dropout < 1.0:
            raise ConfigError(f"bottleneck_dropout must be in [0, 1), got {self.bottleneck_dropout}")
        if not 0.0 <= self.hm_final < 1.0:
            raise ConfigError(f"hm_final must be in [0, 1), got {self.hm_final}")
        if self.crop > self.resize:
            raise ConfigError(f"crop ({self.crop}) cannot exceed resize ({self.resize})")
        if self.layers is not None and len(self.layers) != self.decoder_depth:
            raise ConfigError(
                f"{len(self.layers)} encoder layers but decoder_depth={self.decoder_depth}: "
                "Dinomaly pairs every encoder layer with one decoder layer"
            )

    @property
    def dropout(self) -> float:
        """Effective bottleneck dropout (0 when the Noisy Bottleneck is switched off)."""
        return self.bottleneck_dropout if self.noisy_bottleneck else 0.0
