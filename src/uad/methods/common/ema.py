"""Exponential moving average (mean teacher) of a module's weights.

Tarvainen & Valpola's mean teacher: ``theta_t <- eta * theta_t + (1 - eta) * theta_s``, applied
every ``every`` optimiser steps (AGPNet eq. 3: eta = 0.9999, every 10 steps). The teacher is a deep
copy of the student made at construction, frozen (no gradient, eval mode) and never optimised.
The update is one fused ``torch._foreach_lerp_`` over all floating parameters (no Python loop per
tensor on the hot path); buffers (none in a plain ViT decoder) are copied as they are.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["MeanTeacher"]


class MeanTeacher(nn.Module):
    """EMA copy of ``student``; call :meth:`step` after every optimiser step."""

    def __init__(self, student: nn.Module, decay: float = 0.9999, every: int = 1):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        if every < 1:
            raise ValueError(f"EMA period must be >= 1 step, got {every}")
        self.decay = float(decay)
        self.every = int(every)
        self.module = copy.deepcopy(student)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.module.eval()

    def train(self, mode: bool = True) -> "MeanTeacher":
        """The teacher always runs in eval mode (it is read, never trained)."""
        return super().train(False)

    def due(self, step: int) -> bool:
        """True after optimiser step ``step`` (0-based) when an update is due: after steps
        ``every - 1``, ``2 * every - 1``, ... (every ``every``-th completed step)."""
        return (int(step) + 1) % self.every == 0

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """``theta_t <- decay * theta_t + (1 - decay) * theta_s`` (eq. 3), unconditionally."""
        mine = [p for p in self.module.parameters()]
        theirs = [p.detach() for p in student.parameters()]
        if len(mine) != len(theirs):
            raise ValueError("student and teacher have different parameter lists")
        floats = [(a, b) for a, b in zip(mine, theirs) if a.is_floating_point()]
        if floats:
            torch._foreach_lerp_([a for a, _ in floats], [b.to(a.dtype) for a, b in floats], 1.0 - self.decay)
        for a, b in zip(self.module.buffers(), student.buffers()):
            a.copy_(b)

    def step(self, student: nn.Module, step: int) -> bool:
        """Update when :meth:`due`; returns whether it did."""
        if self.due(step):
            self.update(student)
            return True
        return False

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
