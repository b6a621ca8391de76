"""INP-Former++ losses (Luo et al.): INP coherence (eq. 2-3), soft mining (eq. 5), Dice (eq. 8).

Feature tensors carry their channel axis at ``dim`` (1 for ``(B, C, h, w)`` maps, -1 for
``(B, N, C)`` tokens); every other non-batch axis is a spatial position.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from uad.engine.distributed import sum_across

from ..common.losses import batch_mean, shrink_gradient

__all__ = [
    "inp_coherence_loss_hard",
    "inp_coherence_loss_soft",
    "soft_mining_loss",
    "plain_global_cosine_loss",
    "dice_loss",
]

_EPS = 1e-12


def _cosine_to_inps(features: torch.Tensor, inps: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every feature token to every INP: (B, N, C), (B, M, C) -> (B, N, M)."""
    f = F.normalize(features.float(), dim=-1, eps=1e-8)
    p = F.normalize(inps.float(), dim=-1, eps=1e-8)
    return f @ p.transpose(1, 2)


def inp_coherence_loss_hard(features: torch.Tensor, inps: torch.Tensor) -> torch.Tensor:
    """Eq. 2, INP coherence loss L_c: mean over tokens of the cosine distance to the nearest INP.

    ``features``: F_Q (B, N, C) (the fused encoder tokens); ``inps``: P (B, M, C).
    """
    dist = 1.0 - _cosine_to_inps(features, inps)  # B, N, M
    return dist.min(dim=-1).values.mean()


def inp_coherence_loss_soft(features: torch.Tensor, inps: torch.Tensor) -> torch.Tensor:
    """Eq. 3, soft INP coherence loss L_sc.

    w_{i,m} = softmax_m(S(F_Q(i), p_m)); F^_Q(i) = sum_m w_{i,m} p_m;
    L_sc = 1 - S(vec(F_Q), vec(F^_Q)) (global cosine per image), averaged over the batch.
    """
    weights = torch.softmax(_cosine_to_inps(features, inps), dim=-1)  # B, N, M
    recon = weights @ inps.float()  # B, N, C
    b = features.shape[0]
    return (1.0 - F.cosine_similarity(features.float().reshape(b, -1), recon.reshape(b, -1), dim=1)).mean()


def plain_global_cosine_loss(enc: Sequence[torch.Tensor], dec: Sequence[torch.Tensor]) -> torch.Tensor:
    """Global cosine loss without any mining: mean over groups and images of
    ``1 - S(vec(f_Q), vec(f_D))`` (the reconstruction loss of the Table 9 rows without L_sm)."""
    total = 0.0
    for q, d in zip(enc, dec):
        b = q.shape[0]
        total = total + (1.0 - F.cosine_similarity(q.detach().float().reshape(b, -1), d.float().reshape(b, -1), dim=1)).mean()
    return total / len(enc)


def _point_mse(q: torch.Tensor, d: torch.Tensor, dim: int, reduction: str) -> torch.Tensor:
    sq = (q - d) ** 2
    if reduction == "mean":
        return sq.mean(dim=dim, keepdim=True)
    if reduction == "sum":
        return sq.sum(dim=dim, keepdim=True)
    raise ValueError(f"mse_reduction must be 'mean' or 'sum', got {reduction!r}")


def soft_mining_weights(q: torch.Tensor, d: torch.Tensor, gamma: float, dim: int = 1,
                        mse_reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """The per-point weights of eq. 5, ``w_t = (M_t / u(M_t)) ** gamma`` for t in {cos, mse}.

    M_cos is the per-point cosine distance, M_mse the per-point squared error (averaged or summed
    over channels), u(.) the mean over the whole batch (in a data-parallel run, over every rank's
    shard: :func:`uad.methods.common.losses.batch_mean`). Shapes keep a size-1 channel axis so the
    weights broadcast over channels. Computed without gradient, in float32.
    """
    with torch.no_grad():
        q32, d32 = q.float(), d.float()
        m_cos = (1.0 - F.cosine_similarity(q32, d32, dim=dim)).unsqueeze(dim)
        m_mse = _point_mse(q32, d32, dim, mse_reduction)
        w_cos = (m_cos / batch_mean(m_cos).clamp_min(_EPS)) ** gamma
        w_mse = (m_mse / batch_mean(m_mse).clamp_min(_EPS)) ** gamma
    return w_cos, w_mse


def soft_mining_loss(enc: Sequence[torch.Tensor], dec: Sequence[torch.Tensor], gamma: float = 3.0,
                     dim: int = 1, mse_reduction: str = "mean") -> torch.Tensor:
    """Eq. 5, soft mining loss L_sm = L_sm^cos + L_sm^mse over the L feature groups.

    ``enc``/``dec``: per-group encoder (targets, no gradient) and decoder features of equal shape.
    L_sm^cos = mean_l (1 - S(vec(f_Q^l), vec(f^_D^{l,cos}))) (global cosine per image, batch mean);
    L_sm^mse = mean_l mean_{points} ||f_Q^l - f^_D^{l,mse}||^2 (squared error averaged over channels
    when ``mse_reduction="mean"``, the torch "MSE"; ``"sum"`` is the literal squared L2 norm).
    The loss values are the plain ones; the backward pass of each term multiplies the gradient at
    every point of f_D by that term's weight ``(M_t / u(M_t)) ** gamma`` (detached), so hard points
    (error above the batch mean) get larger gradients. ``gamma = 0`` gives the unweighted loss.
    """
    if len(enc) != len(dec) or not enc:
        raise ValueError(f"soft_mining_loss needs equally many (>0) encoder and decoder groups, got {len(enc)} and {len(dec)}")
    loss_cos = 0.0
    loss_mse = 0.0
    for q, d in zip(enc, dec):
        q = q.detach()
        w_cos, w_mse = soft_mining_weights(q, d, gamma, dim, mse_reduction)
        d_cos = shrink_gradient(d, w_cos)
        d_mse = shrink_gradient(d, w_mse)
        b = q.shape[0]
        loss_cos = loss_cos + (1.0 - F.cosine_similarity(q.float().reshape(b, -1), d_cos.float().reshape(b, -1), dim=1)).mean()
        loss_mse = loss_mse + _point_mse(q.float(), d_mse.float(), dim, mse_reduction).mean()
    return (loss_cos + loss_mse) / len(enc)


def dice_loss(prob: torch.Tensor, target: torch.Tensor, per_image: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """Eq. 8, Dice loss ``1 - 2 sum(p m) / sum(p^2 + m^2)`` on probabilities ``prob`` and a {0,1}
    ``target`` of the same shape (B, 1, H, W).

    ``per_image=False`` (default) sums over the whole batch, so predictions on pseudo-normal
    images (empty masks) still get a gradient through the denominator; ``True`` computes eq. 8 per
    image and averages. Perfect prediction -> 0, disjoint -> 1.
    """
    p = prob.float()
    m = target.float()
    if per_image:
        dims = tuple(range(1, p.ndim))
        num = 2.0 * (p * m).sum(dims)
        den = (p * p + m * m).sum(dims)
        return (1.0 - num / (den + eps)).mean()
    num = 2.0 * sum_across((p * m).sum())  # over the whole batch, every rank's shard included
    den = sum_across((p * p + m * m).sum())
    return 1.0 - num / (den + eps)
