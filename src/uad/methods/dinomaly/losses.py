"""Dinomaly's training objective: the Loose Loss (Sec. 3.4, eq. 4-6) and its Table 3 baseline.

With ``f_E`` / ``f_D`` one encoder / decoder group (B, N, C) and ``F(.)`` the flattening of a
sample's whole feature map::

    D_cos(a, b) = 1 - a^T b / (||a|| ||b||)                                       (eq. 6)
    f_D_hat(h, w) = sg(f_D(h, w))_0.1   if D_cos(f_D(h, w), f_E(h, w)) < k%_batch  (eq. 5)
                  = f_D(h, w)           otherwise
    L_global-hm = D_cos(F(f_E), F(f_D_hat)), averaged over the batch and the pairs  (eq. 4)

``sg(.)_0.1`` leaves the value unchanged and multiplies the gradient by 0.1; ``k%_batch`` selects
the fraction ``k`` of the batch's points with the smallest point-wise distance, ``k`` ramping
linearly from 0 to 0.9 over the first 1,000 iterations (Appendix B; 500 class-separated).

The functions live in :mod:`uad.methods.common.losses`, beside the gradient-scaling device
INP-Former++'s soft mining reuses; this module names the ones Dinomaly's objective is made of, so
the method folder reads like the others. Code name per equation:

* eq. 4-6 with hard mining (``loose_loss: true``): :func:`global_cosine_hm_loss`
* eq. 4 and 6 without mining (Table 3's baseline, ``loose_loss: false``): :func:`global_cosine_loss`
* eq. 5, the points to shrink: :func:`hard_mining_mask`; ``sg(.)_0.1``: :func:`shrink_gradient`
* the ramp of ``k``: :func:`hard_mining_ratio`
"""

from __future__ import annotations

from ..common.losses import (
    global_cosine_hm_loss,
    global_cosine_loss,
    hard_mining_mask,
    hard_mining_ratio,
    shrink_gradient,
)

__all__ = ["global_cosine_hm_loss", "global_cosine_loss", "hard_mining_mask", "hard_mining_ratio", "shrink_gradient"]
