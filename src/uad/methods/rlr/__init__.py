"""RLR: reconstruct from a learnable reference (He et al., ECCV 2024). See README.md."""

from .config import RLRConfig
from .method import RLR

__all__ = ["RLR", "RLRConfig"]
