"""Anomaly maps and image scores of the ViT reconstruction methods (Dinomaly Appendix B).

The map is the point-wise cosine distance (eq. 6) between encoder and decoder feature maps,
averaged over the encoder/decoder pairs (groups), bilinearly upsampled to the input size and
smoothed with a Gaussian (sigma 4). The image score is the mean of the top 1% map values.

Settled from the official evaluation (``utils.evaluation_batch``): upsampling uses
``align_corners=True``; the Gaussian is a 5 x 5 kernel with sigma 4, normalised to sum 1, applied
as a convolution with zero padding (so ``kernel_size`` defaults to 5 here; ``kernel_size=None``
gives the ``2 * int(4 * sigma + 0.5) + 1`` rule of ``scipy.ndimage.gaussian_filter``). The 2-D
kernel is separable, so it is applied as two 1-D convolutions.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "anomaly_map_from_pairs",
    "cosine_distance_maps",
    "gaussian_kernel1d",
    "gaussian_blur",
    "topk_mean_score",
    "upsample_and_smooth",
]


def cosine_distance_maps(
    enc: Sequence[torch.Tensor], dec: Sequence[torch.Tensor], grid: tuple[int, int]
) -> torch.Tensor:
    """Mean over pairs of ``1 - cos(enc[i], dec[i])`` per token (eq. 6), as (B, 1, h, w) float32.

    ``enc[i]``, ``dec[i]``: (B, N, C) patch tokens (prefix tokens removed), N = h * w.
    """
    if len(enc) != len(dec) or not enc:
        raise ValueError(f"need as many encoder as decoder maps (got {len(enc)} and {len(dec)})")
    h, w = grid
    dist = torch.stack(
        [1.0 - F.cosine_similarity(e.float(), d.float(), dim=-1) for e, d in zip(enc, dec)], dim=0
    ).mean(dim=0)  # B, N
    if dist.shape[1] != h * w:
        raise ValueError(f"{dist.shape[1]} tokens do not fill a {h}x{w} grid")
    return dist.reshape(-1, 1, h, w)  # B, N -> B, 1, h, w


def gaussian_kernel1d(sigma: float, kernel_size: int | None = None, device=None,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalised 1-D Gaussian taps; odd ``kernel_size`` (default rule: 2 * int(4 sigma + 0.5) + 1),
    computed in ``dtype``."""
    if kernel_size is None:
        kernel_size = 2 * int(4.0 * sigma + 0.5) + 1
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
    x = torch.arange(kernel_size, dtype=dtype, device=device) - (kernel_size - 1) / 2.0
    k = torch.exp(-(x**2) / (2.0 * sigma**2))
    return k / k.sum()


def _symmetric_index(n: int, pad: int, device=None) -> torch.Tensor:
    """Indices of a length-``n`` axis padded by ``pad`` on both sides with half-sample symmetric
    reflection (``d c b a | a b c d | d c b a``, scipy.ndimage's ``mode="reflect"``), any ``pad``."""
    i = torch.arange(-pad, n + pad, device=device) % (2 * n)
    return torch.where(i < n, i, 2 * n - 1 - i)


def gaussian_blur(maps: torch.Tensor, sigma: float = 4.0, kernel_size: int | None = 5,
                  padding: str = "zeros") -> torch.Tensor:
    """Separable Gaussian blur of (B, 1, H, W) maps (same size out).

    ``padding="zeros"``: zero padding (Dinomaly's evaluation convolution). ``"reflect"``: the
    border handling of ``scipy.ndimage.gaussian_filter`` (half-sample symmetric); with
    ``kernel_size=None`` the result equals ``gaussian_filter(map, sigma)`` (RLR's image score)."""
    if sigma <= 0:
        return maps
    # float32 taps for every float32 / bf16 map (as always); float64 maps get float64 taps
    taps = torch.float64 if maps.dtype == torch.float64 else torch.float32
    k = gaussian_kernel1d(sigma, kernel_size, device=maps.device, dtype=taps).to(maps.dtype)
    pad = k.numel() // 2
    if padding == "zeros":
        x = F.conv2d(maps, k.view(1, 1, 1, -1), padding=(0, pad))  # along W
        return F.conv2d(x, k.view(1, 1, -1, 1), padding=(pad, 0))  # along H
    if padding != "reflect":
        raise ValueError(f"padding must be 'zeros' or 'reflect', got {padding!r}")
    h, w = maps.shape[-2:]
    x = maps.index_select(-1, _symmetric_index(w, pad, maps.device))  # B, 1, H, W + 2 pad
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    x = x.index_select(-2, _symmetric_index(h, pad, maps.device))  # B, 1, H + 2 pad, W
    return F.conv2d(x, k.view(1, 1, -1, 1))


def upsample_and_smooth(
    maps: torch.Tensor, size: int | tuple[int, int], sigma: float = 4.0, kernel_size: int | None = 5
) -> torch.Tensor:
    """(B, 1, h, w) -> (B, H, W): bilinear upsampling (align_corners=True) then Gaussian blur."""
    if isinstance(size, int):
        size = (size, size)
    up = F.interpolate(maps.float(), size=tuple(size), mode="bilinear", align_corners=True)
    return gaussian_blur(up, sigma, kernel_size)[:, 0]


def anomaly_map_from_pairs(
    enc: Sequence[torch.Tensor],
    dec: Sequence[torch.Tensor],
    grid: tuple[int, int],
    size: int | tuple[int, int],
    sigma: float = 4.0,
    kernel_size: int | None = 5,
) -> torch.Tensor:
    """Full map pipeline: mean cosine distance over pairs -> upsample to ``size`` -> blur. (B, H, W)."""
    return upsample_and_smooth(cosine_distance_maps(enc, dec, grid), size, sigma, kernel_size)


def topk_mean_score(maps: torch.Tensor, ratio: float = 0.01) -> torch.Tensor:
    """Image score: mean of the top ``ratio`` fraction of each map's pixels, (B, H, W) -> (B,).

    ``k = int(H * W * ratio)`` as in the official code, at least 1; ``ratio <= 0`` gives the max.
    """
    flat = maps.flatten(1)
    if ratio <= 0:
        return flat.max(dim=1).values
    k = max(1, int(flat.shape[1] * ratio))
    return flat.topk(k, dim=1).values.mean(dim=1)
