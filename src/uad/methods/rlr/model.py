"""RLR's reconstruction network (He et al., ECCV 2024, Sec. 3.2), pure ``nn.Module``s.

One :class:`ReferenceReconstructor` per feature level ``j``: the input tokens ``F_in`` (B, N, C)
and a learnable reference ``R`` (N, C) are projected to the hidden width ``d``; ``K`` blocks
(:class:`RLRBlock`, eq. 4-5) mix them with Local Cross Attention (eq. 10-12) and Masked Learnable
Key Attention (eq. 7-9) without a residual around the attention; a final projection returns
``F_out`` (B, N, C) (eq. 6).

Settled from the public code (``hlr7999/RLR``, ``models/model.py`` and ``models/embedding.py``),
where the paper is silent: the input and reference projections are 1x1 convolutions (Linear
layers here) plus a fixed 2-D sine-cosine position embedding, the output is LayerNorm + Linear;
each attention has its own query / key / value / output projections (8 heads); the masks clip the
window at the map border; the reference starts as N(0, 1).

Speed: the reference and its keys / values do not depend on the batch, so they are projected once
per forward (the code projects a copy per image); the masks are boolean buffers built once per
level with tensor ops; attention is ``F.scaled_dot_product_attention`` with the boolean mask (a
fused kernel, never the explicit (B, heads, N, N) weights of ``nn.MultiheadAttention``).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..common.blocks import Mlp

__all__ = [
    "RLRBlock",
    "RLRModel",
    "ReferenceAttention",
    "ReferenceReconstructor",
    "neighbour_window",
    "sincos_pos_embed_2d",
]


def neighbour_window(h: int, w: int, window: int, device=None) -> torch.Tensor:
    """(N, N) bool, N = h * w row-major: True where token ``j`` lies in the ``window x window``
    neighbourhood of token ``i`` (eq. 1's N_p, clipped at the map border, the token itself included).

    LCA attends only inside it (``M_loc`` = 0 there, -inf elsewhere); MLKA only outside it
    (``M_nei`` = -inf there)."""
    r = window // 2
    ys = torch.arange(h, device=device).repeat_interleave(w)  # N
    xs = torch.arange(w, device=device).repeat(h)  # N
    return ((ys[:, None] - ys[None, :]).abs() <= r) & ((xs[:, None] - xs[None, :]).abs() <= r)


def sincos_pos_embed_2d(h: int, w: int, dim: int) -> torch.Tensor:
    """Fixed 2-D position embedding (N, dim), N = h * w row-major (the public code's
    ``PositionalEmbedding``): the first ``dim / 2`` channels encode the column (sin on even, cos on
    odd channels), the last ``dim / 2`` the row; frequencies ``exp(-2k ln(1e4) / (dim / 2))``."""
    if dim % 4 != 0:
        raise ValueError(f"the 2-D sine-cosine embedding needs a width divisible by 4, got {dim}")
    half = dim // 2
    div = torch.exp(torch.arange(0.0, half, 2) * -(math.log(1e4) / half))  # half / 2
    x = torch.arange(w, dtype=torch.float32)[:, None] * div  # w, half / 2
    y = torch.arange(h, dtype=torch.float32)[:, None] * div  # h, half / 2
    pe = torch.zeros(h, w, dim)
    pe[:, :, 0:half:2] = torch.sin(x)[None]
    pe[:, :, 1:half:2] = torch.cos(x)[None]
    pe[:, :, half::2] = torch.sin(y)[:, None]
    pe[:, :, half + 1 :: 2] = torch.cos(y)[:, None]
    return pe.reshape(h * w, dim)


class ReferenceAttention(nn.Module):
    """One token mixer of an RLR block: multi-head attention whose query comes from the tokens
    ``y`` and whose key / value come from ``y`` or the projected reference ``r`` (by ``kind``).

    ============  =======  ==========  ==========  ======================================
    kind          query    key         value       mask (True = may attend)
    ============  =======  ==========  ==========  ======================================
    lca           y        r           r           the token's own window (eq. 10-12)
    mlka          y        r           y           outside the token's window (eq. 7-9)
    cross         y        r           r           none
    self          y        y           y           none
    masked_self   y        y           y           outside the token's window
    ============  =======  ==========  ==========  ======================================
    """

    SOURCES = {"lca": ("r", "r", "window"), "mlka": ("r", "y", "outside"), "cross": ("r", "r", None),
               "self": ("y", "y", None), "masked_self": ("y", "y", "outside")}

    def __init__(self, dim: int, num_heads: int, kind: str):
        super().__init__()
        if kind not in self.SOURCES:
            raise ValueError(f"unknown attention kind {kind!r}; expected one of {sorted(self.SOURCES)}")
        if dim % num_heads:
            raise ValueError(f"hidden width {dim} is not divisible by {num_heads} heads")
        self.kind, self.heads = kind, num_heads
        self.key_src, self.value_src, self.mask_kind = self.SOURCES[kind]
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        # nn.MultiheadAttention's initialisation (the code's module): Xavier-uniform over the packed
        # (3 dim, dim) input projection, zero biases; the output projection keeps Linear's weights.
        bound = math.sqrt(6.0 / (dim + 3 * dim))
        for lin in (self.q, self.k, self.v):
            nn.init.uniform_(lin.weight, -bound, bound)
            nn.init.zeros_(lin.bias)
        nn.init.zeros_(self.proj.bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)  # B, N, C -> B, H, N, C / H

    def forward(self, y: torch.Tensor, r: torch.Tensor | None, window: torch.Tensor,
                outside: torch.Tensor | None = None) -> torch.Tensor:
        """``y`` (B, N, d) tokens, ``r`` (1, N, d) projected reference (None for the self-attention
        kinds), ``window`` (N, N) bool and its complement ``outside`` (built once by the caller;
        derived here when not given)."""
        b = y.shape[0]
        key_in = r if self.key_src == "r" else y
        value_in = r if self.value_src == "r" else y
        q = self._heads(self.q(y))
        k = self._heads(self.k(key_in))  # 1 or B, H, N, dh
        v = self._heads(self.v(value_in))
        if k.shape[0] != b:
            k = k.expand(b, -1, -1, -1)
        if v.shape[0] != b:
            v = v.expand(b, -1, -1, -1)
        mask = None
        if self.mask_kind == "window":
            mask = window
        elif self.mask_kind == "outside":
            mask = ~window if outside is None else outside
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # B, H, N, dh
        return self.proj(out.transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[3]))


class RLRBlock(nn.Module):
    """Eq. 4-5: ``Z = LN(sum_m w_m Attn_m(Y, R_h))`` (no residual: ``residual=False``),
    ``Y' = LN(FFN(Z) + Z)``. With the default mixers ``[lca, mlka]`` and weights ``[alpha, 1]``
    this is ``LN(MLKA + alpha * LCA)``."""

    def __init__(self, dim: int, num_heads: int, kinds: Sequence[str], weights: Sequence[float],
                 mlp_ratio: float = 4.0, residual: bool = False):
        super().__init__()
        self.mixers = nn.ModuleList(ReferenceAttention(dim, num_heads, k) for k in kinds)
        self.weights = [float(w) for w in weights]
        self.residual = residual
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, y: torch.Tensor, r: torch.Tensor | None, window: torch.Tensor,
                outside: torch.Tensor | None = None) -> torch.Tensor:
        mixed = None
        for w, mixer in zip(self.weights, self.mixers):
            out = w * mixer(y, r, window, outside)
            mixed = out if mixed is None else mixed + out
        if self.residual:
            mixed = y + mixed
        z = self.norm1(mixed)
        return self.norm2(z + self.mlp(z))


class ReferenceReconstructor(nn.Module):
    """RLR for one feature level: ``(B, N, C)`` tokens -> ``(B, N, C)`` reconstruction (eq. 4-6).

    ``io_projection="code"``: ``Y_0 = Linear(F_in) + PE``, ``F_out = Linear(LN(Y_K))`` (public code);
    ``"ffn"``: ``Y_0 = FFN(F_in) (+ PE)``, ``F_out = FFN(Y_K)`` (eq. 6 as written). The reference is
    projected by its own Linear (+ PE) once per forward and shared by all ``depth`` blocks."""

    def __init__(self, channels: int, grid: tuple[int, int], dim: int, window: int, depth: int = 4,
                 num_heads: int = 8, mlp_ratio: float = 4.0, kinds: Sequence[str] = ("lca", "mlka"),
                 weights: Sequence[float] = (2.0, 1.0), residual: bool = False, io_projection: str = "code",
                 pos_embed: bool = True, reference_std: float = 1.0):
        super().__init__()
        h, w = grid
        self.grid, self.window_size, self.channels, self.dim = (int(h), int(w)), int(window), int(channels), int(dim)
        if any(k in ("mlka", "masked_self") for k in kinds) and window >= max(h, w):
            raise ValueError(f"a {window}x{window} neighbour window covers the whole {h}x{w} map: masked attention "
                             "would see no token; use a larger input, fewer deep levels or smaller 'windows'")
        if io_projection == "code":
            self.embed = nn.Linear(channels, dim)
            # the code's 1x1 Conv1d projection: Kaiming-normal weights (fan_in, leaky_relu), default bias
            nn.init.kaiming_normal_(self.embed.weight, mode="fan_in", nonlinearity="leaky_relu")
            self.norm = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, channels)
        else:
            self.embed = Mlp(channels, int(dim * mlp_ratio), dim)
            self.norm = nn.Identity()
            self.head = Mlp(dim, int(dim * mlp_ratio), channels)
        # a reference only where a mixer reads it (the self-attention baselines of Table 3 have none)
        self.ref_embed: nn.Module | None = None
        self.reference: nn.Parameter | None = None
        if any(ReferenceAttention.SOURCES[k][0] == "r" for k in kinds):
            self.ref_embed = nn.Linear(channels, dim)
            if io_projection == "code":
                nn.init.kaiming_normal_(self.ref_embed.weight, mode="fan_in", nonlinearity="leaky_relu")
            self.reference = nn.Parameter(torch.randn(h * w, channels) * float(reference_std))  # N, C
        self.blocks = nn.ModuleList(
            RLRBlock(dim, num_heads, kinds, weights, mlp_ratio, residual) for _ in range(depth)
        )
        pe = sincos_pos_embed_2d(h, w, dim) if pos_embed else torch.zeros(h * w, dim)
        self.register_buffer("pos", pe, persistent=False)  # N, d
        win = neighbour_window(h, w, window)
        self.register_buffer("window", win, persistent=False)  # N, N: LCA's mask
        self.register_buffer("outside", ~win, persistent=False)  # N, N: MLKA's, built once

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` (B, N, C) -> reconstruction (B, N, C)."""
        n = self.grid[0] * self.grid[1]
        if tokens.ndim != 3 or tokens.shape[1] != n or tokens.shape[2] != self.channels:
            raise ValueError(f"expected tokens (B, {n}, {self.channels}) for a {self.grid} map, got {tuple(tokens.shape)}")
        y = self.embed(tokens) + self.pos  # B, N, d
        r = None
        if self.reference is not None:
            r = (self.ref_embed(self.reference) + self.pos).unsqueeze(0)  # 1, N, d: batch-independent
        for blk in self.blocks:
            y = blk(y, r, self.window, self.outside)
        return self.head(self.norm(y))


class RLRModel(nn.Module):
    """One :class:`ReferenceReconstructor` per feature level (``levels[j]``)."""

    def __init__(self, levels: Sequence[ReferenceReconstructor]):
        super().__init__()
        self.levels = nn.ModuleList(levels)

    def forward(self, tokens: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(tokens) != len(self.levels):
            raise ValueError(f"{len(tokens)} feature levels for {len(self.levels)} reconstructors")
        return [lvl(t) for lvl, t in zip(self.levels, tokens)]
