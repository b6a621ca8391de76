"""Dinomaly's Noisy Bottleneck (section 3.2, "Dropout is all you need").

An MLP ``dim -> hidden_ratio*dim -> dim`` whose built-in Dropout is switched on to act as a
pseudo feature anomaly during training. Settled from the official code (``bMlp``): the same
dropout rate is applied three times, to the input tokens, after the activation and after the
output projection. ``drop=0`` gives the noiseless bottleneck of the Table 3 baseline.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

__all__ = ["BottleneckMLP"]


class BottleneckMLP(nn.Module):
    """``dropout -> fc1 -> act -> dropout -> fc2 -> dropout`` (Dinomaly Noisy Bottleneck)."""

    def __init__(
        self,
        dim: int,
        hidden_ratio: float = 4.0,
        drop: float = 0.2,
        out: int | None = None,
        act: Callable[[], nn.Module] = nn.GELU,
    ):
        super().__init__()
        self.fc1 = nn.Linear(dim, int(dim * hidden_ratio))
        self.act = act()
        self.fc2 = nn.Linear(int(dim * hidden_ratio), out or dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(self.drop(x))
        x = self.drop(self.act(x))
        return self.drop(self.fc2(x))
