"""Locally aware CNN features shared by the methods that read several CNN stages.

PatchCore (eq. 1-2), RLR (eq. 1-2) and AGPNet's CNN variant all average each stage map over a
``p x p`` neighbourhood (stride 1, zero padding counted, so the size is kept) and bring the
stages to one grid (bilinear, ``align_corners=False``) before combining them.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["local_average", "to_common_grid"]


def local_average(features: torch.Tensor, p: int = 3) -> torch.Tensor:
    """``p x p`` average pooling, stride 1, zero padding counted: (B, C, h, w) -> (B, C, h, w);
    ``p <= 1`` returns the input."""
    if p <= 1:
        return features
    return F.avg_pool2d(features, kernel_size=p, stride=1, padding=p // 2, count_include_pad=True)


def to_common_grid(maps: Sequence[torch.Tensor], size: tuple[int, int]) -> list[torch.Tensor]:
    """Every (B, C_i, h_i, w_i) map resized bilinearly to ``size`` (maps already that size are
    returned as they are)."""
    size = (int(size[0]), int(size[1]))
    return [m if tuple(m.shape[-2:]) == size else F.interpolate(m, size=size, mode="bilinear", align_corners=False)
            for m in maps]
