"""Transformer building blocks of the ViT reconstruction decoders (Dinomaly, INP-Former++).

Dinomaly (Guo et al., CVPR 2025) builds its decoder from plain pre-norm ViT blocks whose token
mixer is either Softmax Attention (eq. 2) or the "unfocused" Linear Attention (eq. 3,
phi(x) = elu(x) + 1). The blocks here are that block, with the mixer pluggable so INP-Former++
can drop in its prototype-guided attention.

Settled from the official code (guojiajeremy/Dinomaly, ``models/vision_transformer.py``):

* The decoder block has no layer-scale and its drop-path is 0, so neither is implemented.
* Linear Attention is normalised per query: ``out_n = phi(q_n) (phi(K)^T V) / (phi(q_n) . sum_s
  phi(k_s))``. There is no 1/sqrt(d) scale and no epsilon (the denominator is a sum of positive
  terms); ``eps`` below defaults to 0 for that reason.
* The MLP applies dropout after the activation and after the second linear layer (timm style).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Mlp", "LinearAttention", "SoftmaxAttention", "DecoderBlock", "make_attention"]


class Mlp(nn.Module):
    """Feed-forward network ``fc1 -> act -> dropout -> fc2 -> dropout``."""

    def __init__(
        self,
        dim: int,
        hidden: int | None = None,
        out: int | None = None,
        drop: float = 0.0,
        act: Callable[[], nn.Module] = nn.GELU,
    ):
        super().__init__()
        hidden = hidden or dim
        out = out or dim
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act()
        self.fc2 = nn.Linear(hidden, out)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act(self.fc1(x)))
        return self.drop(self.fc2(x))


class _QKVAttention(nn.Module):
    """Shared multi-head projection: ``qkv`` linear in, ``proj`` linear out."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_drop = float(attn_drop)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, c = x.shape
        # B, N, 3C -> 3, B, heads, N, d
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def _merge(self, out: torch.Tensor) -> torch.Tensor:
        b, h, n, d = out.shape
        # B, heads, N, d -> B, N, C
        out = out.transpose(1, 2).reshape(b, n, h * d)
        return self.proj_drop(self.proj(out))


class LinearAttention(_QKVAttention):
    """Linear Attention, Dinomaly eq. 3: ``LA(Q, K, V) = phi(Q) (phi(K)^T V)``, phi = elu + 1.

    Each output row is normalised by ``phi(q_n) . sum_s phi(k_s)``, which makes it identical to
    ``(A / A.sum(-1)) V`` with the explicit N x N matrix ``A = phi(Q) phi(K)^T``, but computed in
    O(N d^2) with batched einsums. The core runs in float32 even under autocast (its cost is
    negligible next to the projections, and bf16 sums over ~800 tokens lose digits).
    ``attn_drop`` is accepted for signature compatibility; there is no attention matrix to drop
    from (the official implementation ignores it too).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        eps: float = 0.0,
    ):
        super().__init__(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            q = F.elu(q.float()) + 1.0
            k = F.elu(k.float()) + 1.0
            v = v.float()
            kv = torch.einsum("bhnd,bhne->bhde", k, v)  # B, heads, d, d
            denom = torch.einsum("bhnd,bhd->bhn", q, k.sum(dim=2))  # B, heads, N
            out = torch.einsum("bhnd,bhde->bhne", q, kv) / (denom.unsqueeze(-1) + self.eps)
        return self._merge(out.to(x.dtype))


class SoftmaxAttention(_QKVAttention):
    """Softmax Attention, Dinomaly eq. 2 with the 1/sqrt(d) scale, through PyTorch's fused
    ``scaled_dot_product_attention`` (flash / memory-efficient kernels where available).

    ``attn_drop`` is standard attention-probability dropout (the official code's DropKey variant
    is only ever used at rate 0).
    """

    def forward(self, x: torch.Tensor, need_weights: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``need_weights``: also return the softmax matrix (B, heads, N, N) in float32, computed
        explicitly from the same projections (no dropout on that path: it serves readers of the
        attention, such as AGPNet's mean-teacher masks, which run in eval mode)."""
        q, k, v = self._split(x)
        if not need_weights:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
            return self._merge(out)
        a = ((q * self.head_dim ** -0.5) @ k.transpose(-2, -1)).float().softmax(dim=-1)  # B, heads, N, N
        return self._merge(a.to(v.dtype) @ v), a


_ATTENTIONS: dict[str, type[nn.Module]] = {"linear": LinearAttention, "softmax": SoftmaxAttention}


def make_attention(
    attn: str | nn.Module | Callable[..., nn.Module],
    dim: int,
    num_heads: int,
    qkv_bias: bool = True,
    attn_drop: float = 0.0,
    proj_drop: float = 0.0,
) -> nn.Module:
    """Build a token mixer from a name (``"linear"``, ``"softmax"``), a module, or a factory
    called as ``factory(dim, num_heads=..., qkv_bias=..., attn_drop=..., proj_drop=...)``."""
    if isinstance(attn, nn.Module):
        return attn
    if isinstance(attn, str):
        if attn not in _ATTENTIONS:
            raise ValueError(f"unknown attention {attn!r}; expected one of {sorted(_ATTENTIONS)}")
        attn = _ATTENTIONS[attn]
    return attn(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)


class DecoderBlock(nn.Module):
    """Pre-norm ViT block: ``x = x + attn(norm1(x)); x = x + mlp(norm2(x))``.

    LayerNorm eps defaults to 1e-8 (Dinomaly's decoder). No layer-scale, no drop-path (the
    official decoder uses neither). Extra positional/keyword arguments of :meth:`forward` go to
    the attention module, so a mixer that needs more than the tokens (prototypes, a mask) fits.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        attn: str | nn.Module | Callable[..., nn.Module] = "linear",
        ln_eps: float = 1e-8,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        act: Callable[[], nn.Module] = nn.GELU,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=ln_eps)
        self.attn = make_attention(attn, dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.norm2 = nn.LayerNorm(dim, eps=ln_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop, act=act)

    def forward(self, x: torch.Tensor, *attn_args, need_weights: bool = False, **attn_kwargs):
        """``need_weights``: return ``(output, attention weights)``; the mixer must support it
        (:class:`SoftmaxAttention` does)."""
        if need_weights:
            y, weights = self.attn(self.norm1(x), *attn_args, need_weights=True, **attn_kwargs)
        else:
            y = self.attn(self.norm1(x), *attn_args, **attn_kwargs)
        x = x + y
        x = x + self.mlp(self.norm2(x))
        return (x, weights) if need_weights else x
