"""AGPNet: attention-guided perturbation of frozen features (see :mod:`.method`)."""

from .config import AGPNetConfig
from .method import AGPNet
from .model import AGPDecoder

__all__ = ["AGPDecoder", "AGPNet", "AGPNetConfig"]
