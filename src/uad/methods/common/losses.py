"""Dinomaly's Loose Loss (section 3.4, eq. 4-6) and the plain global cosine loss.

``L_global-hm = D_cos(F(f_E), F(f_D_hat))`` (eq. 4): the cosine distance between the *flattened*
encoder and decoder feature maps of each sample, averaged over the batch and over the
encoder/decoder pairs. ``f_D_hat`` (eq. 5) equals ``f_D`` in the forward pass, but the gradient of
the k% feature points with the smallest point-wise cosine distance *within the batch* is shrunk
to one tenth (``sg(.)_0.1``; a full stop-gradient is unstable, footnote 2).

Settled from the official code (``global_cosine_hm_percent``): the threshold is computed per pair
over all ``B * N`` points; the ``n_keep = int(B * N * (1 - k))`` largest distances keep their full
gradient and the points *strictly* below the smallest of those get the shrunk one (with ties
nothing extra is shrunk; at ``k = 0`` nothing is); the encoder side is detached; the total is
divided by the number of pairs. ``k`` ramps linearly from 0 to 0.9 over the first 1000
iterations (500 in the class-separated setting): :func:`hard_mining_ratio`.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from uad.engine import distributed

__all__ = ["batch_mean", "global_cosine_loss", "global_cosine_hm_loss", "hard_mining_ratio", "shrink_gradient",
           "hard_mining_mask"]


def hard_mining_ratio(step: int, final: float = 0.9, warmup_iters: int = 1000) -> float:
    """Fraction ``k`` of well-reconstructed points whose gradient is shrunk at iteration ``step``:
    ``min(final * step / warmup_iters, final)`` (Dinomaly Appendix B)."""
    if warmup_iters <= 0:
        return float(final)
    return float(min(final * step / warmup_iters, final))


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by a fixed weight tensor."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(weight)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (weight,) = ctx.saved_tensors
        return grad * weight.to(grad.dtype), None


def shrink_gradient(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Return ``x`` unchanged; its gradient is multiplied by ``scale`` (broadcast, no gradient).

    The device both papers use to re-weight points without changing the loss value: Dinomaly's
    ``sg(.)_0.1`` hard mining (eq. 4-5) and INP-Former++'s soft mining weights (eq. 5)."""
    scale = torch.as_tensor(scale, device=x.device)
    return _ScaleGrad.apply(x, scale.detach())


@torch.no_grad()
def batch_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of ``x`` over the whole batch: in a data-parallel run, over every rank's shard
    (equal shard shapes), the same number one process gets on the whole batch. No gradient."""
    # accumulated in float64 on both paths, so one process and several agree to float64 rounding
    total = distributed.sum_across(x.double().sum())
    return (total / (x.numel() * distributed.world_size())).to(x.dtype)


@torch.no_grad()
def hard_mining_mask(point_dist: torch.Tensor, k_ratio: float) -> torch.Tensor:
    """Boolean mask of the points to shrink: distances strictly below the ``n_keep``-th largest,
    ``n_keep = int(numel * (1 - k_ratio))`` (all points when ``n_keep`` is 0). The threshold is
    taken over the whole batch: in a data-parallel run over every rank's points (gathered), so
    each rank shrinks exactly the points one process would."""
    flat = distributed.gather_cat(point_dist.reshape(-1))
    n_keep = int(flat.numel() * (1.0 - k_ratio))
    if n_keep <= 0:
        return torch.ones_like(point_dist, dtype=torch.bool)
    if n_keep >= flat.numel():
        thresh = flat.min()
    else:
        thresh = torch.kthvalue(flat, flat.numel() - n_keep + 1).values  # n_keep-th largest
    return point_dist < thresh


def _global_cosine(e: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    # B, ... -> B, (rest): cosine between whole flattened feature maps, mean over the batch
    return (1.0 - F.cosine_similarity(e.flatten(1), d.flatten(1), dim=1)).mean()


def global_cosine_loss(enc: Sequence[torch.Tensor], dec: Sequence[torch.Tensor]) -> torch.Tensor:
    """Plain global cosine loss (the Table 3 baseline without Loose Loss), averaged over pairs.

    ``enc[i]`` / ``dec[i]``: (B, N, C) tokens; the encoder side is detached. Computed in float32.
    """
    total = sum(_global_cosine(e.detach().float(), d.float()) for e, d in zip(enc, dec))
    return total / len(enc)


def global_cosine_hm_loss(
    enc: Sequence[torch.Tensor], dec: Sequence[torch.Tensor], k_ratio: float, shrink: float = 0.1
) -> torch.Tensor:
    """Loose Loss, eq. 4-5: global cosine with hard mining, averaged over the pairs.

    ``enc[i]`` / ``dec[i]``: (B, N, C) tokens (channel last). The points with the smallest
    point-wise cosine distance (a fraction ``k_ratio`` of the batch's points) have the gradient
    reaching ``dec[i]`` multiplied by ``shrink``; the loss value is that of the plain global
    cosine loss. Computed in float32.
    """
    if len(enc) != len(dec) or not enc:
        raise ValueError(f"need as many encoder as decoder maps (got {len(enc)} and {len(dec)})")
    total = 0.0
    for e, d in zip(enc, dec):
        e = e.detach().float()
        d = d.float()
        with torch.no_grad():
            point_dist = 1.0 - F.cosine_similarity(e, d, dim=-1)  # B, N
            mask = hard_mining_mask(point_dist, k_ratio)
            scale = torch.where(mask, shrink, 1.0).to(d.dtype).unsqueeze(-1)  # B, N, 1
        total = total + _global_cosine(e, shrink_gradient(d, scale))
    return total / len(enc)
