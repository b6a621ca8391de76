"""AGPNet's reconstruction decoder: a plain Vision-Transformer decoder (Sec. 3.2.2, "Decoder").

Tokens (B, N, C) of the fused frozen features -> optional Linear to the decoder width -> plus a
learnable position embedding -> ``depth`` pre-norm ViT blocks (softmax attention through the fused
kernel, GELU MLP) -> optional Linear back to C. No class token and no final norm: the target
F_clean is a sum of normalised layers whose per-token scale a final LayerNorm could not reach.
The same blocks return their attention matrices when asked (``need_attention=True``): that is how
the mean teacher's attention A_learn is read, from the one block implementation.
"""

from __future__ import annotations

import torch
from torch import nn

from ..common.blocks import DecoderBlock
from ..common.recon import init_trunc_normal

__all__ = ["AGPDecoder"]


class AGPDecoder(nn.Module):
    """Plain ViT decoder over a fixed ``grid`` of tokens; see the module docstring."""

    def __init__(self, in_dim: int, grid: tuple[int, int], dim: int | None = None, depth: int = 4,
                 num_heads: int = 6, mlp_ratio: float = 4.0, qkv_bias: bool = True, ln_eps: float = 1e-6):
        super().__init__()
        dim = int(dim or in_dim)
        if dim % num_heads:
            raise ValueError(f"decoder width {dim} is not divisible by {num_heads} heads; set decoder_dim or num_heads")
        self.in_dim, self.dim, self.grid = int(in_dim), dim, (int(grid[0]), int(grid[1]))
        self.in_proj = nn.Linear(in_dim, dim) if dim != in_dim else nn.Identity()
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], dim))
        self.blocks = nn.ModuleList(
            DecoderBlock(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, attn="softmax", ln_eps=ln_eps)
            for _ in range(depth)
        )
        self.out_proj = nn.Linear(dim, in_dim) if dim != in_dim else nn.Identity()
        init_trunc_normal(self, std=0.02)  # ViT initialisation
        nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-0.04, b=0.04)

    def forward(self, x: torch.Tensor, need_attention: bool = False):
        """``x``: (B, N, C) -> (B, N, C); with ``need_attention`` also the list of the blocks'
        (B, heads, N, N) float32 softmax matrices."""
        if x.shape[1] != self.pos_embed.shape[1]:
            raise ValueError(f"decoder built for {self.pos_embed.shape[1]} tokens {self.grid}, got {x.shape[1]}")
        h = self.in_proj(x) + self.pos_embed
        attns = []
        for blk in self.blocks:
            if need_attention:
                h, a = blk(h, need_weights=True)
                attns.append(a)
            else:
                h = blk(h)
        out = self.out_proj(h)
        return (out, attns) if need_attention else out
