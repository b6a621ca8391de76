"""AGPNet's training objective (Sec. 3.3, eq. 6-7).

``L_total = 1/2 (L_feat + L_img,feat)`` (eq. 6), each term ``MSE(F_hat, F_clean)`` between the
decoder's reconstruction of a perturbed input and the clean fused features (eq. 7). The method
sends both perturbed branches through the decoder as one batch of ``2B``; the mean squared error
over that batch against ``F_clean`` repeated twice is exactly the half-sum of eq. 6, since both
branches have the same number of elements.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["reconstruction_loss"]


def reconstruction_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Eq. 7: ``MSE(F_hat, F_clean)``, the mean over tokens and channels (the paper's 1 / (H_f W_f)
    prefactor only rescales the loss, which AdamW ignores up to epsilon)."""
    return F.mse_loss(outputs.float(), targets.float())
