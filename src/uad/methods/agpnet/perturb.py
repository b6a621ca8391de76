"""AGPNet's formulas as batched tensor functions (no loop over samples or pixels).

Eq. 1 (feature fusion), eq. 2 (attention aggregation and the final mask), eq. 4 (attention-weighted
feature noise), the image-level attention mask and eq. 8 (anomaly map) with the image score; the
training loss (eq. 6-7) is in :mod:`.losses`. Attention maps are per image ``(B, N)`` over the
``N = h * w`` feature locations.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "aggregate_decoder_attention",
    "aggregate_encoder_attention",
    "anomaly_map",
    "energy_map",
    "feature_perturbation",
    "final_mask",
    "fuse_features",
    "image_mask",
    "image_score",
    "minmax",
]


def minmax(a: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Phi_norm: per-image max-min normalisation over all but the first dimension, to [0, 1]
    (a constant map becomes all zeros)."""
    flat = a.flatten(1)
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(eps)).view_as(a)


def fuse_features(features: Sequence[torch.Tensor], fusion: str = "sum", norm: str = "layernorm",
                  norm_module: torch.nn.Module | None = None, eps: float = 1e-6) -> torch.Tensor:
    """Eq. 1: ``F_clean = sum_l sigma(F_l)`` over tokens ``(B, N, C_l)`` in float32.

    ``norm``: ``layernorm`` (parameter-free LayerNorm over channels, eps 1e-6), ``encoder_norm``
    (``norm_module``, the frozen encoder's own final norm) or ``none``. ``fusion``: ``sum`` (the
    paper) or ``concat`` (along channels; for CNN stages of different widths)."""
    out = []
    for f in features:
        f = f.float()
        if norm == "layernorm":
            f = F.layer_norm(f, (f.shape[-1],), eps=eps)
        elif norm == "encoder_norm":
            if norm_module is None:
                raise ValueError("feature_norm 'encoder_norm' needs the encoder's norm module")
            f = norm_module(f).float()
        elif norm != "none":
            raise ValueError(f"unknown feature norm {norm!r}")
        out.append(f)
    if fusion == "sum":
        widths = {f.shape[-1] for f in out}
        if len(widths) != 1:
            raise ValueError(f"eq. 1 sums features of equal width; got widths {sorted(widths)} (use fusion: concat)")
        return torch.stack(out).sum(dim=0)
    if fusion == "concat":
        return torch.cat(out, dim=-1)
    raise ValueError(f"unknown fusion {fusion!r}")


def aggregate_encoder_attention(attn: Sequence[torch.Tensor], num_prefix: int, kind: str = "cls") -> torch.Tensor:
    """A_prior (eq. 2): the element-wise average over the tapped layers of each layer's map A_l.

    ``attn``: per layer (B, heads, R, P + N) softmax rows (R = P for ``attention="prefix"``, P + N
    for the full matrix). ``cls``: A_l = the class token's attention to the N patches, averaged over
    heads. ``received``: A_l = the attention each patch receives from the patches, averaged over
    heads and queries. Returns (B, N) float32."""
    maps = []
    for a in attn:
        a = a.float()
        if kind == "cls":
            maps.append(a[:, :, 0, num_prefix:].mean(dim=1))
        elif kind == "received":
            if a.shape[2] != a.shape[3]:
                raise ValueError("'received' attention needs the full attention matrix")
            maps.append(a[:, :, num_prefix:, num_prefix:].mean(dim=(1, 2)))
        else:
            raise ValueError(f"unknown encoder attention aggregation {kind!r}")
    return torch.stack(maps).mean(dim=0)


def aggregate_decoder_attention(attn: Sequence[torch.Tensor], kind: str = "received") -> torch.Tensor:
    """A_learn (eq. 2): the element-wise average over the K decoder blocks of one value per token
    from each block's (B, heads, N, N) softmax matrix (the decoder has no class token): the
    attention the token ``received`` (mean over heads and queries), the attention it pays itself
    (``diagonal``, mean over heads) or the largest it receives (``max_query``, mean over heads).
    Returns (B, N) float32."""
    maps = []
    for a in attn:
        a = a.float()
        if kind == "received":
            maps.append(a.mean(dim=(1, 2)))
        elif kind == "diagonal":
            maps.append(a.diagonal(dim1=-2, dim2=-1).mean(dim=1))
        elif kind == "max_query":
            maps.append(a.amax(dim=2).mean(dim=1))
        else:
            raise ValueError(f"unknown decoder attention aggregation {kind!r}")
    return torch.stack(maps).mean(dim=0)


def energy_map(features: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """What stands in for A_prior on a CNN (no attention): the feature energy, read **before** the
    per-token normalisation of eq. 1 (after it every token has zero mean and unit variance, and
    mean_c |F| is nearly flat). Per tapped layer ``A_l = mean_c |F_l|`` over its tokens
    ``(B, N, C_l)``, scaled to sum to 1 over the N locations (a spatial distribution, as a row of
    attention is, so no layer dominates by its scale), then averaged over the layers as eq. 2
    aggregates attention maps. Returns (B, N) float32."""
    if isinstance(features, torch.Tensor):
        features = [features]
    maps = []
    for f in features:
        e = f.float().abs().mean(dim=-1)  # B, N
        maps.append(e / e.sum(dim=1, keepdim=True).clamp_min(1e-12))
    return torch.stack(maps).mean(dim=0)


def final_mask(prior: torch.Tensor | None, learn: torch.Tensor | None) -> torch.Tensor:
    """``Phi_norm(A_final)`` with ``A_final = Phi_norm(A_prior) + Phi_norm(A_learn)`` (eq. 2; eq. 4
    normalises it again). Either may be ``None`` (Table 6's L / D ablations). (B, N) in [0, 1]."""
    parts = [minmax(a.float()) for a in (prior, learn) if a is not None]
    if not parts:
        raise ValueError("final_mask needs A_prior, A_learn or both")
    return minmax(sum(parts))


def feature_perturbation(features: torch.Tensor, mask: torch.Tensor, alpha: float, beta: float,
                         noise_mean: float = 0.0, noise_std: float = 1.0,
                         noise: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 4: ``F' = F + E * (alpha * mask + beta)``, E i.i.d. ``N(noise_mean, noise_std^2)`` of
    the features' shape, ``mask`` (B, N) in [0, 1] broadcast over channels. ``noise``: E itself
    (tests); drawn from the global generator otherwise."""
    if noise is None:
        noise = torch.randn_like(features) * noise_std + noise_mean
    return features + noise * (alpha * mask[..., None] + beta)


def image_mask(mask: torch.Tensor, grid: tuple[int, int], size: tuple[int, int], ratio: float) -> torch.Tensor:
    """The image-level mask: the (B, N) map on its (h, w) grid upsampled bilinearly to ``size``,
    binarised to its top ``ratio`` fraction of pixels per image, exactly ``round(ratio * H * W)``
    of them (ties broken arbitrarily; ``ratio = 1``: every pixel).
    Returns (B, 1, H, W) bool."""
    b = mask.shape[0]
    up = F.interpolate(mask.float().view(b, 1, *grid), size=size, mode="bilinear", align_corners=False)
    flat = up.flatten(1)
    n = flat.shape[1]
    keep = min(max(int(round(float(ratio) * n)), 0), n)
    if keep >= n:
        return torch.ones_like(up, dtype=torch.bool)
    if keep == 0:
        return torch.zeros_like(up, dtype=torch.bool)
    # exactly `keep` pixels per image (the upsampled map has plateaus: a threshold would keep ties)
    out = torch.zeros_like(flat, dtype=torch.bool)
    out.scatter_(1, flat.topk(keep, dim=1, sorted=False).indices, True)
    return out.view_as(up)


def anomaly_map(features: torch.Tensor, reconstruction: torch.Tensor, grid: tuple[int, int],
                size: tuple[int, int]) -> torch.Tensor:
    """Eq. 8: ``M_hw = ||F_hw - F_hat_hw||_2``, upsampled bilinearly to ``size``: (B, H, W) float32."""
    b = features.shape[0]
    m = (features.float() - reconstruction.float()).norm(dim=-1).view(b, 1, *grid)
    return F.interpolate(m, size=size, mode="bilinear", align_corners=False)[:, 0]


def image_score(maps: torch.Tensor, pool: int = 16) -> torch.Tensor:
    """Image score: the maximum of the average-pooled map (kernel ``pool``, stride 1, no padding;
    ``pool <= 1``: the plain maximum). (B, H, W) -> (B,)."""
    if pool > 1:
        k = min(pool, maps.shape[-2], maps.shape[-1])
        maps = F.avg_pool2d(maps[:, None].float(), k, stride=1)[:, 0]
    return maps.flatten(1).amax(dim=1)
