"""Device choice and seeded determinism."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def pick_device(device: str | None = "auto") -> torch.device:
    """``"auto"`` -> CUDA when present, else CPU; anything else is passed to :class:`torch.device`."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} was asked for but CUDA is not available on this machine")
    return dev


def autocast_dtype_for(device: torch.device, precision: str = "bf16") -> torch.dtype | None:
    """bf16 autocast on CUDA (the brief's default), nothing on CPU or when ``precision="fp32"``."""
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be 'bf16' or 'fp32', got {precision!r}")
    if device.type == "cuda" and precision == "bf16":
        return torch.bfloat16
    return None


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed python, numpy and torch; on CUDA also ask for deterministic kernels where cheap."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic
