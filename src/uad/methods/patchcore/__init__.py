"""PatchCore (Roth et al., CVPR 2022): the memory-bank baseline. See README.md.

Importing this package imports no torch: ``declaration.py`` describes the method to the rest of the
project, and the names below are loaded from their modules on first use.
"""

from uad.exports import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    ".config": ("PatchCoreConfig",),
    ".model": ("aggregate_patches", "greedy_coreset", "nearest_neighbors", "reweighted_image_score", "smooth_maps"),
    ".method": ("PatchCore",),
})
