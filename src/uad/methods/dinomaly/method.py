"""Dinomaly (Guo et al., CVPR 2025) as an :class:`~uad.methods.base.AnomalyMethod`.

Frozen DINOv2-R encoder -> mean of 8 middle layers -> Noisy Bottleneck -> 8 Linear-Attention
decoder blocks; encoder and decoder layers fused into 2 groups (Loose Constraint); trained with
the Loose Loss (global cosine with hard mining, eq. 4-5); map = group-mean cosine distance,
upsampled and smoothed; score = mean of the top 1% of the map.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ..common.groups import fuse_groups
from ..common.recon import Encoded, ViTReconstructionMethod
from ..registry import register
from .config import DinomalyConfig
from .losses import global_cosine_hm_loss, global_cosine_loss, hard_mining_ratio
from .model import DinomalyModel

__all__ = ["Dinomaly"]


@register("dinomaly")
class Dinomaly(ViTReconstructionMethod):
    config_class = DinomalyConfig
    stages = ("train",)
    # Training is iterative (not one pass over cached features), so it declares no features stage;
    # caching 8 layers of tokens per image would cost more disk than it saves.
    cfg: DinomalyConfig

    def __init__(self, params: Mapping[str, Any] | None = None):
        super().__init__(params)
        if len(self.layers) != self.cfg.decoder_depth:
            raise ValueError(
                f"{len(self.layers)} encoder layers {self.layers} but decoder_depth={self.cfg.decoder_depth}"
            )

    def adapt_to_setting(self, setting: str) -> None:
        """The paper trains class-separated models for 5,000 iterations with a 500-iteration
        hard-mining ramp (Appendix B); explicitly given ``iterations``/``hm_warmup_iters`` win."""
        if setting != "one_class":
            return
        if "iterations" not in self.params:
            self.cfg.iterations = self.cfg.class_separated_iterations
        if "hm_warmup_iters" not in self.params:
            self.cfg.hm_warmup_iters = self.cfg.class_separated_hm_warmup_iters

    def build_model(self) -> nn.Module:
        cfg = self.cfg
        dim = self.embed_dim
        heads = self.decoder_heads()
        return DinomalyModel(
            dim,
            heads,
            depth=cfg.decoder_depth,
            mlp_ratio=cfg.mlp_ratio,
            qkv_bias=cfg.qkv_bias,
            attention=cfg.attention,
            ln_eps=cfg.ln_eps,
            bottleneck_dropout=cfg.dropout,
            bottleneck_ratio=cfg.bottleneck_ratio,
            init_std=cfg.init_std,
        )

    def decode(self, enc: Encoded) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Encoder / decoder group features, (B, N, C) patch tokens each."""
        n_prefix = 0
        seqs = enc.tokens
        if self.cfg.decoder_prefix_tokens and enc.prefix and enc.prefix[0].shape[1] > 0:
            n_prefix = enc.prefix[0].shape[1]
            seqs = [torch.cat([p, t], dim=1) for p, t in zip(enc.prefix, enc.tokens)]  # B, P + N, C
        dec = [d[:, n_prefix:] for d in self.run_model(seqs)]  # drop prefix tokens: B, N, C
        return fuse_groups(enc.tokens, self.groups), fuse_groups(dec, self.groups)

    def hard_mining_ratio(self, step: int) -> float:
        return hard_mining_ratio(step, self.cfg.hm_final, self.cfg.hm_warmup_iters)

    def loss(self, enc_groups: list[torch.Tensor], dec_groups: list[torch.Tensor], step: int) -> torch.Tensor:
        if self.cfg.loose_loss:
            return global_cosine_hm_loss(enc_groups, dec_groups, self.hard_mining_ratio(step), self.cfg.hm_shrink)
        return global_cosine_loss(enc_groups, dec_groups)

    def tags(self) -> dict[str, str]:
        tags = super().tags()
        cfg = self.cfg
        tags.update(
            attention=cfg.attention,
            noisy_bottleneck=str(cfg.noisy_bottleneck),
            loose_loss=str(cfg.loose_loss),
        )
        return tags
