"""Frozen Vision Transformer token extractor (timm ``VisionTransformer``).

Dinomaly (Guo et al., CVPR 2025) and INP-Former++ read the patch tokens of several middle blocks
of a DINO / DINOv2-with-registers ViT; some variants also need the prefix (class / register)
tokens or the attention maps. This module runs timm's blocks by hand so that

* only the blocks up to the deepest requested one are executed,
* prefix tokens (``num_prefix_tokens`` = class + registers) are split off every output,
* attention maps of the requested blocks are computed explicitly from the block's ``qkv``
  projection (softmax(q k^T / sqrt(d)), Vaswani et al. 2017) while the other blocks keep timm's
  fused ``scaled_dot_product_attention``,
* any input size divisible by the patch size works (``dynamic_img_size=True``: the position
  embedding is interpolated by timm, as DINOv2 does for 392 / 448 crops).
"""

from __future__ import annotations

from typing import Any, Sequence

import timm
import torch
from torch import nn

from .base import Backbone, FeatureOutput, normalize_layers
from .weights import WeightsInfo


def _check_block(blk: nn.Module, i: int) -> None:
    need = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
    missing = [a for a in need if not hasattr(blk, a)]
    attn = getattr(blk, "attn", None)
    if missing or not isinstance(getattr(attn, "qkv", None), nn.Linear):
        raise NotImplementedError(
            f"block {i} ({type(blk).__name__}) is not a pre-norm timm ViT block with a fused qkv projection; "
            "explicit attention maps are not supported for this model (build it with need_attention=False)"
        )


def block_forward_with_attention(blk: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One pre-norm ViT block (timm ``Block``) with the attention matrix made explicit.

    ``x``: (B, N, C) -> (block output (B, N, C), attention (B, heads, N, N) after softmax).
    Same arithmetic as timm's ``Attention`` (qk-norm, scale, optional scale-norm and gate) so the
    block output equals timm's fused path up to floating point.
    """
    att = blk.attn
    h = blk.norm1(x)
    B, N, _ = h.shape
    heads = att.num_heads
    head_dim = getattr(att, "head_dim", att.qkv.out_features // (3 * heads))
    gate = att.gate(h).sigmoid() if getattr(att, "gate", None) is not None else None
    qkv = att.qkv(h).reshape(B, N, 3, heads, head_dim).permute(2, 0, 3, 1, 4)  # 3, B, H, N, d
    q, k, v = qkv.unbind(0)
    q, k = att.q_norm(q), att.k_norm(k)
    a = ((q * att.scale) @ k.transpose(-2, -1)).float().softmax(dim=-1)  # B, H, N, N
    o = (a.to(v.dtype) @ v).transpose(1, 2).reshape(B, N, heads * head_dim)  # B, N, H*d
    o = getattr(att, "norm", nn.Identity())(o)
    if gate is not None:
        o = o * gate
    o = att.proj_drop(att.proj(o))
    x = x + blk.drop_path1(blk.ls1(o))
    x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    return x, a


class ViTBackbone(Backbone):
    """Frozen timm ViT returning per-block patch tokens (see :class:`FeatureOutput`).

    ``layers`` are 0-based block indices; the output of block ``i`` is taken (before the final
    norm, as Dinomaly and INP-Former++ use it). Default: the last block.
    """

    kind = "vit"

    def __init__(
        self,
        model: nn.Module,
        name: str,
        weights_info: WeightsInfo,
        layers: Sequence[int] | None = None,
        need_attention: bool = False,
    ):
        if not isinstance(model, timm.models.VisionTransformer):
            raise TypeError(f"{name!r} is a {type(model).__name__}, not a timm VisionTransformer")
        data_config = timm.data.resolve_data_config({}, model=model)
        super().__init__(name, weights_info, data_config)
        if hasattr(model, "reset_classifier"):
            model.reset_classifier(0)  # the head is never used
        self.model = model
        self.num_layers = len(model.blocks)
        self.embed_dim = int(model.embed_dim)
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        self.num_heads = int(model.blocks[0].attn.num_heads) if hasattr(model.blocks[0], "attn") else None
        ps = model.patch_embed.patch_size
        self.patch_size = int(ps[0] if isinstance(ps, (tuple, list)) else ps)
        self.layers = normalize_layers(layers, self.num_layers, self._what(), default=(self.num_layers - 1,))
        self.need_attention = bool(need_attention)
        if self.need_attention:
            for i in self.layers:
                _check_block(model.blocks[i], i)
        self._freeze()

    def _what(self) -> str:
        return f"{self.name} (a ViT with {self.num_layers} blocks)"

    def list_layers(self) -> list[dict[str, Any]]:
        return [
            {"index": i, "module": f"blocks.{i}", "channels": self.embed_dim, "reduction": self.patch_size}
            for i in range(self.num_layers)
        ]

    def forward(self, x: torch.Tensor, layers: Sequence[int] | None = None) -> FeatureOutput:
        """``x``: (B, 3, H, W) normalised with ``data_config`` mean/std; H, W multiples of the patch.

        ``layers`` overrides the layers chosen at build time for this call.
        """
        layers = self.layers if layers is None else normalize_layers(layers, self.num_layers, self._what(), ())
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got {tuple(x.shape)}")
        H, W = x.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"input {H}x{W} is not a multiple of the patch size {self.patch_size} of {self.name}")
        grid = (H // self.patch_size, W // self.patch_size)
        m = self.model
        P = self.num_prefix_tokens
        wanted = set(layers)
        h = m.patch_embed(x)  # B, h, w, C (dynamic size) or B, N, C
        h = m._pos_embed(h)  # B, P + N, C
        h = m.patch_drop(h)
        h = m.norm_pre(h)
        outs: dict[int, torch.Tensor] = {}
        attns: dict[int, torch.Tensor] = {}
        for i in range(max(layers) + 1):  # stop after the deepest requested block
            blk = m.blocks[i]
            if self.need_attention and i in wanted:
                _check_block(blk, i)
                h, attns[i] = block_forward_with_attention(blk, h)
            else:
                h = blk(h)
            if i in wanted:
                outs[i] = h
        return FeatureOutput(
            tokens=[outs[i][:, P:] for i in layers],  # B, N, C
            prefix=[outs[i][:, :P] for i in layers],  # B, P, C
            grid=grid,
            attn=[attns[i] for i in layers] if self.need_attention else None,
            layers=tuple(layers),
        )
