"""AGPNet: attention-guided perturbation of frozen features (see :mod:`.method`).

Importing this package imports no torch: ``declaration.py`` describes the method to the rest of the
project, and the names below are loaded from their modules on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> the module (relative) that defines it
_EXPORTS = {
    "AGPNet": ".method",
    "AGPNetConfig": ".config",
    "AGPDecoder": ".model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
