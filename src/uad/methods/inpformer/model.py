"""INP-Former++ networks (Luo et al.): INP Extractor (eq. 1), INP-guided decoder (eq. 4),
segmentation head and feature residual (eq. 7), and the eq. 9 anomaly map.

Settled from the official INP-Former code (luow23/INP-Former, ``models/vision_transformer.py``
and ``models/uad.py``; the ++ code is not public):

* INP Extractor = one pre-norm ViT block whose attention takes Q from the M learnable tokens and
  K, V from the encoder tokens: ``T' = T + Attn(LN1(T), LN1(F_Q))`` (the *same* LayerNorm for
  both inputs), ``P = T' + MLP(LN2(T'))``; softmax attention with the 1/sqrt(d) scale. The tokens
  start as ``randn(M, C)``. F_Q is the *mean* of the 8 encoder layers (paper: "sum"; identical
  after the LayerNorm, and cosine losses do not see the scale).
* INP-guided attention: Q from the decoder tokens, K and V from the INPs (one ``kv`` linear);
  q and k are L2-normalised per head and the attention is ``ReLU(q k^T * s_h)`` with a learnable
  per-head scale ``s_h`` (initialised to 1), *not* row-normalised; then the output projection.
  The paper's eq. 4 writes ``ReLU(Q K^T)`` and omits the normalisation and the scale.
* INP-guided decoder block: ``y = Attn(LN1(x), LN1(P))``; ``x = y + MLP(LN2(y))``: no residual
  around the attention (eq. 4). LayerNorm eps 1e-8, MLP ratio 4, qkv bias.
* Class and register tokens are removed *before* bottleneck and decoder (``remove_class_token``);
  the decoder outputs are returned in reverse order (position i pairs with encoder layer i).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..common.blocks import DecoderBlock, Mlp
from ..common.bottleneck import BottleneckMLP
from ..common.recon import init_trunc_normal
from ..common.scoring import gaussian_blur

__all__ = [
    "CrossAttention",
    "INPExtractor",
    "INPGuidedAttention",
    "INPGuidedDecoderBlock",
    "INPFormerModel",
    "SegmentationHead",
    "residual_features",
    "reconstruction_error_map",
    "combine_anomaly_maps",
]


class CrossAttention(nn.Module):
    """Multi-head softmax cross-attention: Q from ``x`` (B, T, C), K and V from ``y`` (B, N, C)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        n = y.shape[1]
        q = self.q(x).reshape(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # B, h, T, d
        kv = self.kv(y).reshape(b, n, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 2, B, h, N, d
        out = F.scaled_dot_product_attention(q, kv[0], kv[1])  # B, h, T, d
        return self.proj(out.transpose(1, 2).reshape(b, t, c))


class INPExtractor(nn.Module):
    """Eq. 1: M learnable tokens aggregate the encoder tokens into M INPs (one ViT block).

    ``forward(features)``: F_Q (B, N, C) -> P (B, M, C).
    """

    def __init__(self, dim: int, num_tokens: int = 6, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, ln_eps: float = 1e-8):
        super().__init__()
        self.tokens = nn.Parameter(torch.randn(num_tokens, dim))  # T (M, C), official init randn
        self.norm1 = nn.LayerNorm(dim, eps=ln_eps)
        self.attn = CrossAttention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=ln_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        b = features.shape[0]
        t = self.tokens.unsqueeze(0).expand(b, -1, -1)  # M, C -> B, M, C
        t = t + self.attn(self.norm1(t), self.norm1(features))  # T' = Attn(Q=T, K,V=F_Q) + T
        return t + self.mlp(self.norm2(t))  # P = FFN(T') + T'


class INPGuidedAttention(nn.Module):
    """INP-guided attention (eq. 4): Q from the decoder tokens x (B, N, C), K and V from the INPs
    P (B, M, C); ``A = ReLU(norm(q) norm(k)^T * s_h)`` per head (no softmax), output ``A V``
    projected. Cost O(N M C) instead of O(N^2 C)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = nn.Parameter(torch.ones(num_heads, 1, 1))  # learnable per-head scale s_h
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def attention(self, x: torch.Tensor, inps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention map (B, h, N, M) and values (B, h, M, d)."""
        b, n, _ = x.shape
        m = inps.shape[1]
        q = self.q(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # B, h, N, d
        kv = self.kv(inps).reshape(b, m, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 2, B, h, M, d
        q = F.normalize(q, dim=-1)
        k = F.normalize(kv[0], dim=-1)
        attn = F.relu((q @ k.transpose(-2, -1)) * self.scale)  # B, h, N, M
        return attn, kv[1]

    def forward(self, x: torch.Tensor, inps: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        attn, v = self.attention(x, inps)
        out = attn @ v  # B, h, N, d
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class INPGuidedDecoderBlock(nn.Module):
    """One INP-guided decoder layer (eq. 4): ``y = Attn(LN1(x), LN1(P))``, ``out = y + MLP(LN2(y))``.

    There is deliberately no residual around the attention: the output is built from the INPs
    only, so anomalous input tokens are not copied through.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, ln_eps: float = 1e-8):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=ln_eps)
        self.attn = INPGuidedAttention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=ln_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, inps: torch.Tensor) -> torch.Tensor:
        y = self.attn(self.norm1(x), self.norm1(inps))
        return y + self.mlp(self.norm2(y))


class INPFormerModel(nn.Module):
    """Bottleneck + INP Extractor + ``depth`` INP-guided decoder blocks (+ optional seg head).

    ``use_inp=False`` is the Table 9 baseline: no extractor, plain pre-norm ViT decoder blocks
    with softmax self-attention and both residuals. ``seg_channels`` (two ints) adds the
    :class:`SegmentationHead` of the residual-learning stage as ``seg_head`` (else ``None``).
    All Linear layers get the official trunc-normal(0.01) init; the INP tokens stay ``randn``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        depth: int = 8,
        num_inp_tokens: int = 6,
        use_inp: bool = True,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        ln_eps: float = 1e-8,
        bottleneck_dropout: float = 0.0,
        bottleneck_ratio: float = 4.0,
        init_std: float = 0.01,
        seg_channels: Sequence[int] | None = (256, 64),
    ):
        super().__init__()
        self.use_inp = bool(use_inp)
        self.bottleneck = BottleneckMLP(dim, hidden_ratio=bottleneck_ratio, drop=bottleneck_dropout)
        if self.use_inp:
            self.extractor: INPExtractor | None = INPExtractor(dim, num_inp_tokens, num_heads, mlp_ratio, qkv_bias, ln_eps)
            blocks = [INPGuidedDecoderBlock(dim, num_heads, mlp_ratio, qkv_bias, ln_eps) for _ in range(depth)]
        else:
            self.extractor = None
            blocks = [DecoderBlock(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, attn="softmax", ln_eps=ln_eps)
                      for _ in range(depth)]
        self.decoder = nn.ModuleList(blocks)
        init_trunc_normal(self, std=init_std)  # before the seg head: it keeps the conv defaults
        self.seg_head = SegmentationHead(dim, tuple(seg_channels)) if seg_channels else None

    def forward(self, enc_layers: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor]:
        """``enc_layers``: per encoder layer (B, N, C) patch tokens.

        Returns (decoder outputs per block, reversed so index i reconstructs encoder layer i,
        each (B, N, C); the INPs P (B, M, C) or None; the fused encoder tokens F_Q (B, N, C)).
        """
        fused = torch.stack(list(enc_layers), dim=0).mean(dim=0)  # L x (B, N, C) -> B, N, C
        inps = self.extractor(fused) if self.extractor is not None else None
        x = self.bottleneck(fused)
        outs = []
        for blk in self.decoder:
            x = blk(x, inps) if inps is not None else blk(x)
            outs.append(x)
        return outs[::-1], inps, fused


class SegmentationHead(nn.Module):
    """Seg head H of the residual learning stage: two transposed convolutions and a convolution.

    The paper gives only "two transposed convolution layers and a convolution layer"; the sizes are
    ours: ``ConvT(C, c1, 2, stride 2) -> BN -> ReLU -> ConvT(c1, c2, 2, stride 2) -> BN -> ReLU ->
    Conv(c2, 1, 3, pad 1)``. Input: the eq. 7 residual (B, C, h, w) at the feature grid; output:
    logits (B, 1, 4h, 4w), bilinearly upsampled to ``out_size`` when given (paper: "followed by
    upsampling to the original image size using bilinear interpolation").
    """

    def __init__(self, in_channels: int, channels: Sequence[int] = (256, 64)):
        super().__init__()
        c1, c2 = (int(c) for c in channels)
        self.up1 = nn.Sequential(nn.ConvTranspose2d(in_channels, c1, 2, stride=2), nn.BatchNorm2d(c1), nn.ReLU(inplace=True))
        self.up2 = nn.Sequential(nn.ConvTranspose2d(c1, c2, 2, stride=2), nn.BatchNorm2d(c2), nn.ReLU(inplace=True))
        self.out = nn.Conv2d(c2, 1, 3, padding=1)

    def forward(self, residual: torch.Tensor, out_size: tuple[int, int] | None = None) -> torch.Tensor:
        x = self.out(self.up2(self.up1(residual)))  # B, C, h, w -> B, 1, 4h, 4w
        if out_size is not None and tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode="bilinear", align_corners=False)
        return x


def residual_features(f_q: Sequence[torch.Tensor], f_d: Sequence[torch.Tensor], dim: int = -1,
                      stop_gradient: bool = True) -> torch.Tensor:
    """Eq. 7: ``f_res = mean_l [(1 - S(f_Q^l, f_D^l)) * |f_Q^l - f_D^l|]`` per point, over the
    L feature groups; stop-gradient (detached) by default. Same shape as one group's features;
    ``dim`` is the channel axis (-1 for (B, N, C) tokens)."""
    if len(f_q) != len(f_d) or not f_q:
        raise ValueError(f"need as many encoder as decoder groups (got {len(f_q)} and {len(f_d)})")
    total = 0.0
    for q, d in zip(f_q, f_d):
        q, d = q.float(), d.float()
        cos_dist = 1.0 - F.cosine_similarity(q, d, dim=dim).unsqueeze(dim)
        total = total + cos_dist * (q - d).abs()
    res = total / len(f_q)
    return res.detach() if stop_gradient else res


def reconstruction_error_map(f_q: Sequence[torch.Tensor], f_d: Sequence[torch.Tensor], grid: tuple[int, int],
                             kind: str = "eq9") -> torch.Tensor:
    """A_rec of eq. 9 as (B, 1, h, w) float32 from per-group (B, N, C) tokens:
    ``mean_l 1/2 [(1 - S(f_Q^l, f_D^l)) + ||f_Q^l - f_D^l||_2]``; ``kind="cosine"`` keeps only the
    cosine distance (the conference version's map)."""
    h, w = grid
    maps = []
    for q, d in zip(f_q, f_d):
        q, d = q.float(), d.float()
        cos_dist = 1.0 - F.cosine_similarity(q, d, dim=-1)  # B, N
        if kind == "eq9":
            maps.append(0.5 * (cos_dist + torch.linalg.vector_norm(q - d, dim=-1)))
        elif kind == "cosine":
            maps.append(cos_dist)
        else:
            raise ValueError(f"unknown reconstruction map kind {kind!r}")
    a = torch.stack(maps, dim=0).mean(dim=0)
    return a.reshape(a.shape[0], 1, h, w)  # B, N -> B, 1, h, w


def combine_anomaly_maps(a_rec: torch.Tensor, m_pred: torch.Tensor | None, size: tuple[int, int],
                         sigma: float = 4.0, kernel_size: int | None = 5) -> torch.Tensor:
    """Eq. 9: ``A = (Theta(A_rec) + M_pred) / 2`` with Theta = bilinear upsampling (align_corners,
    as the official evaluation), then the Gaussian smoothing of the official evaluation applied to
    A (linear, so the same as smoothing both terms). ``a_rec`` (B, 1, h, w); ``m_pred`` (B, 1, H, W)
    probabilities or None (no residual learning: A = Theta(A_rec)). Returns (B, H, W) float32."""
    up = F.interpolate(a_rec.float(), size=tuple(size), mode="bilinear", align_corners=True)
    if m_pred is not None:
        up = 0.5 * (up + m_pred.float())
    return gaussian_blur(up, sigma, kernel_size)[:, 0]
