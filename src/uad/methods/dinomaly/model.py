"""Dinomaly's trainable network: Noisy Bottleneck + 8-block ViT decoder (Fig. 2).

Settled from the official code (``models/uad.py``, ``ViTill``):

* the bottleneck input is the *mean* of the 8 encoder layers' token sequences;
* the full sequences go through bottleneck and decoder, prefix tokens (class + 4 registers for
  DINOv2-R) included; they are dropped only afterwards, before grouping/loss/map;
* the decoder has no final LayerNorm: the outputs of its 8 blocks are returned as they are;
* the decoder outputs are returned in *reverse* order, so position ``i`` pairs with encoder layer
  ``i``: the last decoder block reconstructs the shallowest encoder layer (top-to-bottom
  consistency of the columnar ViT).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..common.blocks import DecoderBlock
from ..common.bottleneck import BottleneckMLP
from ..common.recon import init_trunc_normal

__all__ = ["DinomalyModel"]


class DinomalyModel(nn.Module):
    """Bottleneck MLP + ``depth`` pre-norm ViT decoder blocks."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        depth: int = 8,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        attention: str = "linear",
        ln_eps: float = 1e-8,
        bottleneck_dropout: float = 0.2,
        bottleneck_ratio: float = 4.0,
        init_std: float = 0.01,
    ):
        super().__init__()
        self.bottleneck = BottleneckMLP(embed_dim, hidden_ratio=bottleneck_ratio, drop=bottleneck_dropout)
        self.decoder = nn.ModuleList(
            DecoderBlock(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, attn=attention, ln_eps=ln_eps)
            for _ in range(depth)
        )
        init_trunc_normal(self, std=init_std)

    def forward(self, enc_layers: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``enc_layers``: per encoder layer (B, T, C) tokens -> per decoder block (B, T, C),
        reversed (index i reconstructs encoder layer i)."""
        x = torch.stack(list(enc_layers), dim=0).mean(dim=0)  # L x (B, T, C) -> B, T, C
        x = self.bottleneck(x)
        outs = []
        for blk in self.decoder:
            x = blk(x)
            outs.append(x)
        return outs[::-1]
