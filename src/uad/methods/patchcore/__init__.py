"""PatchCore (Roth et al., CVPR 2022): the memory-bank baseline. See README.md."""

from .config import PatchCoreConfig
from .model import aggregate_patches, greedy_coreset, nearest_neighbors, reweighted_image_score, smooth_maps

__all__ = [
    "PatchCoreConfig",
    "aggregate_patches",
    "greedy_coreset",
    "nearest_neighbors",
    "reweighted_image_score",
    "smooth_maps",
]

from .method import PatchCore  # noqa: E402  (registers "patchcore")

__all__ += ["PatchCore"]
