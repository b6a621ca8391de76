"""Frozen Vision Transformer token extractor (timm ``VisionTransformer``).

Dinomaly (Guo et al., CVPR 2025) and INP-Former++ read the patch tokens of several middle blocks
of a DINO / DINOv2-with-registers ViT; some variants also need the prefix (class / register)
tokens or the attention maps. This module runs timm's blocks by hand so that

* only the blocks up to the deepest requested one are executed,
* prefix tokens (``num_prefix_tokens`` = class + registers) are split off every output,
* attention maps of the requested blocks are computed explicitly from the block's ``qkv``
  projection (softmax(q k^T / sqrt(d)), Vaswani et al. 2017) while the other blocks keep timm's
  fused ``scaled_dot_product_attention``,
* any input size divisible by the patch size works. DINOv2 models keep their native position
  embedding (37 x 37 for 518 px) and interpolate it at every forward exactly as DINOv2's own
  ``interpolate_pos_encoding`` does (bicubic, ``scale_factor = (g + 0.1) / 37``, no antialias: what
  Dinomaly and INP-Former's official code run); other ViTs use timm's resampling
  (``dynamic_img_size=True``).
"""

from __future__ import annotations

from typing import Any, Sequence

import timm
import torch
import torch.nn.functional as F
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


def block_forward_with_attention(blk: nn.Module, x: torch.Tensor, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One pre-norm ViT block (timm ``Block``) with the attention matrix made explicit.

    ``x``: (B, N, C) -> (block output (B, N, C), attention after softmax). ``rows=None``: the whole
    matrix (B, heads, N, N), and the output is computed from it. ``rows=r``: only the first ``r``
    query rows (B, heads, r, N), e.g. the class token's attention to every token; the block output
    then goes through the fused ``scaled_dot_product_attention`` from the same q, k, v (one qkv
    projection, no N x N matrix in memory).
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
    if rows is None:
        a = ((q * att.scale) @ k.transpose(-2, -1)).float().softmax(dim=-1)  # B, H, N, N
        o = a.to(v.dtype) @ v
    else:
        a = ((q[:, :, :rows] * att.scale) @ k.transpose(-2, -1)).float().softmax(dim=-1)  # B, H, r, N
        o = F.scaled_dot_product_attention(q, k, v, scale=att.scale)
    o = o.transpose(1, 2).reshape(B, N, heads * head_dim)  # B, N, H*d
    o = getattr(att, "norm", nn.Identity())(o)
    if gate is not None:
        o = o * gate
    o = att.proj_drop(att.proj(o))
    x = x + blk.drop_path1(blk.ls1(o))
    x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    return x, a


#: DINOv2's ``interpolate_offset``: the scale factor is (g + 0.1) / M, not g / M
DINOV2_INTERPOLATE_OFFSET = 0.1


def dinov2_patch_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int], offset: float = DINOV2_INTERPOLATE_OFFSET) -> torch.Tensor:
    """DINOv2's ``interpolate_pos_encoding`` for the patch part of a position embedding.

    ``pos_embed``: (1, M * M, C) patch position embedding of the native M x M grid; ``grid``:
    (h, w) of the input. Returns (1, h * w, C): bicubic interpolation with
    ``scale_factor = ((h + offset) / M, (w + offset) / M)``, no antialias, in float32, the input's
    grid unchanged when it is the native one (as DINOv2 returns its embedding as is). DINOv2 writes
    the factors as ``(w + offset) / M, (h + offset) / M``; the same for square inputs (the papers'),
    this orientation is the one that keeps rows and columns apart on non-square inputs."""
    n, c = pos_embed.shape[1], pos_embed.shape[2]
    m = int(round(n ** 0.5))
    if m * m != n:
        raise ValueError(f"position embedding of {n} tokens is not a square grid")
    h, w = grid
    if (h, w) == (m, m):
        return pos_embed
    pe = pos_embed.float().reshape(1, m, m, c).permute(0, 3, 1, 2)  # 1, C, M, M
    pe = F.interpolate(pe, scale_factor=((h + offset) / m, (w + offset) / m), mode="bicubic", antialias=False)
    if tuple(pe.shape[-2:]) != (h, w):
        raise RuntimeError(f"interpolated position embedding has grid {tuple(pe.shape[-2:])}, expected {(h, w)}")
    return pe.permute(0, 2, 3, 1).reshape(1, h * w, c).to(pos_embed.dtype)


def uses_dino_interpolation(name: str) -> bool:
    """DINO and DINOv2 / DINOv2-R checkpoints (timm names ``*_dinov2*``, ``*.dino``): both official
    codes interpolate with the 0.1 offset and no antialias."""
    return "dino" in name.lower()


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
        self.dinov2_pos = uses_dino_interpolation(name) and model.pos_embed is not None
        self._pos_cache: dict[tuple, torch.Tensor] = {}
        if self.need_attention:
            for i in self.layers:
                _check_block(model.blocks[i], i)
        self._freeze()

    def _dinov2_embed(self, h: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Patch tokens + DINOv2-interpolated position embedding, then the prefix tokens:
        (B, h, w, C) or (B, N, C) -> (B, P + N, C). The interpolated embedding is cached per grid,
        dtype and device (the encoder is frozen)."""
        m = self.model
        B, C = h.shape[0], h.shape[-1]
        h = h.reshape(B, -1, C)  # B, N, C
        n_pre = 0 if m.no_embed_class else self.num_prefix_tokens
        key = (grid, m.pos_embed.dtype, m.pos_embed.device, m.pos_embed.data_ptr())
        pe = self._pos_cache.get(key)
        if pe is None:
            pe = dinov2_patch_pos_embed(m.pos_embed[:, n_pre:], grid)
            self._pos_cache = {key: pe}
        prefix = []
        if m.cls_token is not None:
            cls = m.cls_token.expand(B, -1, -1)
            if n_pre:  # the class token's own position embedding (models without registers)
                cls = cls + m.pos_embed[:, :1]
            prefix.append(cls)
        if m.reg_token is not None:
            prefix.append(m.reg_token.expand(B, -1, -1))
        return m.pos_drop(torch.cat(prefix + [h + pe], dim=1))

    def _what(self) -> str:
        return f"{self.name} (a ViT with {self.num_layers} blocks)"

    def list_layers(self) -> list[dict[str, Any]]:
        return [
            {"index": i, "module": f"blocks.{i}", "channels": self.embed_dim, "reduction": self.patch_size}
            for i in range(self.num_layers)
        ]

    def forward(self, x: torch.Tensor, layers: Sequence[int] | None = None, attention: str | None = None) -> FeatureOutput:
        """``x``: (B, 3, H, W) normalised with ``data_config`` mean/std; H, W multiples of the patch.

        ``layers`` overrides the layers chosen at build time for this call. ``attention`` overrides
        ``need_attention`` for this call: ``"full"`` (the (B, heads, P + N, P + N) maps), ``"prefix"``
        (only the rows of the P prefix tokens, (B, heads, P, P + N), with the fused kernel for the
        block output) or ``"none"``.
        """
        layers = self.layers if layers is None else normalize_layers(layers, self.num_layers, self._what(), ())
        mode = ("full" if self.need_attention else "none") if attention is None else attention
        if mode not in ("full", "prefix", "none"):
            raise ValueError(f"attention must be 'full', 'prefix' or 'none', got {attention!r}")
        if mode == "prefix" and self.num_prefix_tokens < 1:
            raise ValueError(f"{self.name} has no prefix (class) token: attention='prefix' is undefined")
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
        h = self._dinov2_embed(h, grid) if self.dinov2_pos else m._pos_embed(h)  # B, P + N, C
        h = m.patch_drop(h)
        h = m.norm_pre(h)
        outs: dict[int, torch.Tensor] = {}
        attns: dict[int, torch.Tensor] = {}
        for i in range(max(layers) + 1):  # stop after the deepest requested block
            blk = m.blocks[i]
            if mode != "none" and i in wanted:
                _check_block(blk, i)
                h, attns[i] = block_forward_with_attention(blk, h, rows=P if mode == "prefix" else None)
            else:
                h = blk(h)
            if i in wanted:
                outs[i] = h
        return FeatureOutput(
            tokens=[outs[i][:, P:] for i in layers],  # B, N, C
            prefix=[outs[i][:, :P] for i in layers],  # B, P, C
            grid=grid,
            attn=[attns[i] for i in layers] if mode != "none" else None,
            layers=tuple(layers),
        )
