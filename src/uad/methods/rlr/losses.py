"""RLR's feature preprocessing, perturbation, loss and anomaly map (He et al., ECCV 2024).

* :func:`local_average` - eq. 1-2 (from :mod:`uad.methods.common.features`): locally aware features, ``p x p`` average pooling with stride 1
  and zero padding counted at the border (``nn.AvgPool2d(3, 1, 1)`` in the public code).
* :func:`feature_jitter` - eq. 3: Gaussian noise on the input tokens; the code's scale is
  ``noise_scale * ||f||_2 / C`` per token (UniAD's feature jitter), applied to ``noise_prob`` of
  the tokens.
* :func:`token_distance` - the per-token distance of eq. 14 / 16: the mean squared error over
  channels (code, ``"mse"``) or the L2 norm (paper, ``"l2"``), plus the cosine distance of eq. 13/15.
* :func:`reconstruction_loss` - eq. 13-14 for one level: distance term + cosine term, each
  averaged over tokens and the batch; the total is the sum over levels.
* :func:`anomaly_map` - eq. 15-16: per level distance + cosine distance, bilinearly upsampled
  (align_corners=True as the code) and averaged over levels.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..common.features import local_average  # eq. 1-2 (shared with PatchCore and AGPNet)

__all__ = ["anomaly_map", "feature_jitter", "local_average", "reconstruction_loss", "token_distance"]


def feature_jitter(tokens: torch.Tensor, scale: float, prob: float = 1.0,
                   noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Eq. 3: ``F_in = F_org + P`` with ``P = eps * scale * ||f||_2 / C`` per token, ``eps ~ N(0, 1)``.

    ``tokens`` (B, N, C). With ``prob < 1`` exactly ``int((1 - prob) * N)`` tokens per image, drawn
    at random, stay clean (the code's rule). ``noise`` (B, N, C) supplies ``eps`` (tests); otherwise
    it is drawn from ``generator`` (or the global generator)."""
    if scale <= 0 or prob <= 0:
        return tokens
    b, n, c = tokens.shape
    if noise is None:
        noise = torch.randn(tokens.shape, generator=generator, device=tokens.device, dtype=tokens.dtype)
    jitter = noise * (tokens.norm(dim=-1, keepdim=True) / c) * scale  # B, N, C
    keep_clean = int((1.0 - prob) * n)
    if keep_clean > 0:
        order = torch.rand(b, n, generator=generator, device=tokens.device).argsort(dim=1)
        clean = torch.zeros(b, n, dtype=torch.bool, device=tokens.device)
        clean.scatter_(1, order[:, :keep_clean], True)
        jitter = jitter.masked_fill(clean.unsqueeze(-1), 0.0)
    return tokens + jitter


def token_distance(output: torch.Tensor, target: torch.Tensor, distance: str = "mse") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``(distance, cosine distance)``, each (B, N), for (B, N, C) tokens (fp32)."""
    output, target = output.float(), target.float()
    diff = output - target
    if distance == "mse":
        d = diff.pow(2).mean(dim=-1)
    elif distance == "l2":
        d = diff.norm(dim=-1)
    else:
        raise ValueError(f"distance must be 'mse' or 'l2', got {distance!r}")
    return d, 1.0 - F.cosine_similarity(output, target, dim=-1)


def reconstruction_loss(output: torch.Tensor, target: torch.Tensor, distance: str = "mse") -> torch.Tensor:
    """Eq. 13-14 for one level: mean over batch and tokens of the distance plus the cosine distance.

    With ``distance="mse"`` this is the code's ``MSELoss(out, target) + mean(1 - cos)``."""
    d, cos = token_distance(output, target, distance)
    return d.mean() + cos.mean()


def anomaly_map(outputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], grids: Sequence[tuple[int, int]],
                size: tuple[int, int], distance: str = "mse") -> torch.Tensor:
    """Eq. 15-16: ``mean_j Upsample(d_j + S_cos^j)`` -> (B, H, W) float32."""
    total = None
    for out, tgt, (h, w) in zip(outputs, targets, grids):
        d, cos = token_distance(out, tgt, distance)
        level = (d + cos).reshape(-1, 1, h, w)  # B, N -> B, 1, h, w
        up = F.interpolate(level, size=tuple(size), mode="bilinear", align_corners=True)
        total = up if total is None else total + up
    if total is None:
        raise ValueError("anomaly_map needs at least one level")
    return (total / len(outputs))[:, 0]
