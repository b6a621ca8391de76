"""CostFilter-AD's training objective (eq. 5) and the class-aware focal gamma.

``P`` = softmax of the filter's logits resized to the image (bilinear, corners aligned), ``m`` the
synthetic anomaly mask (0/1, (B, 1, H, W))::

    L = w_f * Focal_gamma(P, m) + w_ce * CE(cls, c) + w_ssim * (1 - SSIM(P_1, m))
        + w_iou * (1 - softIoU(P_1, m)) + w_mse * MSE(P_1, m)

Paper: w = (1, 1, 0.1, 0.1, 0); released code: (1, 0.5, 0.1, 0.1, 1).

* Focal (Lin et al.) per image with its own gamma, on probabilities: one-hot target clamped to
  [eps, 1 - eps], ``p_t = sum_c onehot_c P_c + eps``, ``mean_pixels -(1 - p_t)^gamma log p_t``, then
  the mean over the batch (eps = 1e-5, alpha = 1).
* gamma (eq. 5's class-aware modulation), from the adaptor's logits ``z``:
  ``paper``: ``gamma0 - sigmoid(max z)`` when ``argmax z`` is the true class, else ``gamma0``;
  ``official``: ``max(3 - max z, 1.5)``, and 3.5 when the class is wrong; ``fixed``: ``gamma0``.
  gamma is not detached (as in the released code, the focal term's gradient also reaches the
  adaptor through it).
* SSIM: 11x11 Gaussian window (sigma 1.5), zero padding, dynamic range 1.
* soft-IoU: ``1 - (sum P m + 1) / (sum P + sum m - sum P m + 1)`` over the whole batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from uad.engine.distributed import sum_across

__all__ = ["focal_gamma", "focal_loss", "ssim_loss", "soft_iou_loss", "costfilter_loss"]


def focal_gamma(cls_logits: torch.Tensor, target: torch.Tensor, rule: str = "paper", gamma0: float = 3.0) -> torch.Tensor:
    """Per-image focal gamma (B,) from the adaptor's logits (B, K) and the true classes (B,)."""
    top, pred = cls_logits.max(dim=1)
    correct = pred == target
    if rule == "paper":
        return torch.where(correct, gamma0 - torch.sigmoid(top), torch.full_like(top, gamma0))
    if rule == "official":
        return torch.where(correct, torch.clamp(3.0 - top, min=1.5), torch.full_like(top, 3.5))
    if rule == "fixed":
        return torch.full_like(top, gamma0)
    raise ValueError(f"unknown gamma rule {rule!r}")


def focal_loss(prob: torch.Tensor, mask: torch.Tensor, gamma: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``prob`` (B, 2, H, W) softmax output, ``mask`` (B, 1, H, W) in {0, 1}, ``gamma`` (B,)."""
    t = (mask[:, 0] > 0.5).to(prob.dtype)
    on = torch.clamp(t, eps, 1.0 - eps)
    off = torch.clamp(1.0 - t, eps, 1.0 - eps)
    pt = off * prob[:, 0] + on * prob[:, 1] + eps  # B, H, W
    per_pixel = -torch.pow(1.0 - pt, gamma.reshape(-1, 1, 1)) * torch.log(pt)
    return per_pixel.flatten(1).mean(dim=1).mean()


def _gaussian_window(size: int, sigma: float, device, dtype) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] @ g[None, :]).to(device=device, dtype=dtype)[None, None]


def ssim_loss(pred: torch.Tensor, target: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """``1 - SSIM(pred, target)``, (B, 1, H, W) each, dynamic range 1."""
    w = _gaussian_window(window, sigma, pred.device, pred.dtype)
    pad = window // 2
    stacked = torch.cat([pred, target, pred * pred, target * target, pred * target], dim=1)  # B, 5, H, W
    b = stacked.shape[0]
    mom = F.conv2d(stacked.reshape(b * 5, 1, *stacked.shape[-2:]), w, padding=pad).reshape(b, 5, *stacked.shape[-2:])
    mu1, mu2, e11, e22, e12 = mom.unbind(dim=1)
    s11, s22, s12 = e11 - mu1 * mu1, e22 - mu2 * mu2, e12 - mu1 * mu2
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ssim = ((2 * mu1 * mu2 + c1) * (2 * s12 + c2)) / ((mu1 * mu1 + mu2 * mu2 + c1) * (s11 + s22 + c2))
    return 1.0 - ssim.mean()


def soft_iou_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Over the whole batch (in a data-parallel run, every rank's shard: :func:`sum_across`)."""
    inter = sum_across((pred * target).sum())
    total = sum_across(pred.sum() + target.sum())
    return 1.0 - (inter + 1.0) / (total - inter + 1.0)


def costfilter_loss(logits: torch.Tensor, cls_logits: torch.Tensor, mask: torch.Tensor, class_ids: torch.Tensor,
                    weights: dict[str, float], gamma_rule: str = "paper", gamma0: float = 3.0
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. 5 for a batch: ``logits`` (B, 2, S, S) of the filter, ``cls_logits`` (B, K), ``mask``
    (B, 1, H, W). Returns the total and its weighted terms (for logging)."""
    size = tuple(mask.shape[-2:])
    prob = torch.softmax(logits.float(), dim=1)
    if tuple(prob.shape[-2:]) != size:
        prob = F.interpolate(prob, size=size, mode="bilinear", align_corners=True)
    target = (mask > 0.5).float()
    anomaly = prob[:, 1:2]
    cls_logits = cls_logits.float()
    gamma = focal_gamma(cls_logits, class_ids, gamma_rule, gamma0)
    terms: dict[str, torch.Tensor] = {}
    if weights.get("focal", 0.0):
        terms["focal"] = weights["focal"] * focal_loss(prob, target, gamma)
    if weights.get("ce", 0.0):
        terms["ce"] = weights["ce"] * F.cross_entropy(cls_logits, class_ids)
    if weights.get("ssim", 0.0):
        terms["ssim"] = weights["ssim"] * ssim_loss(anomaly, target)
    if weights.get("iou", 0.0):
        terms["iou"] = weights["iou"] * soft_iou_loss(anomaly, target)
    if weights.get("mse", 0.0):
        terms["mse"] = weights["mse"] * F.mse_loss(anomaly, target)
    total = sum(terms.values()) if terms else logits.sum() * 0.0
    return total, terms
