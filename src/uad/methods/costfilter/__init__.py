"""CostFilter-AD: matching-cost filtering over any trained base detector (see :mod:`.method`).

Importing this package imports no torch: ``declaration.py`` describes the method to the rest of the
project, and the names below are loaded from their modules on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> the module (relative) that defines it
_EXPORTS = {
    "BaseView": ".bases",
    "EmbeddingBase": ".bases",
    "FilterBase": ".bases",
    "ReconstructionBase": ".bases",
    "make_base": ".bases",
    "PRESETS": ".config",
    "CostFilterConfig": ".config",
    "costfilter_loss": ".losses",
    "focal_gamma": ".losses",
    "focal_loss": ".losses",
    "soft_iou_loss": ".losses",
    "ssim_loss": ".losses",
    "CostFilter": ".method",
    "CostFilterNet": ".network",
    "convert_official_state_dict": ".network",
    "aligned_distance_map": ".volume",
    "build_volume": ".volume",
    "cost_matrix": ".volume",
    "select_matching": ".volume",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
