"""Lazy package exports (PEP 562), one mechanism for every package that must import cheaply.

A package's ``__init__`` names what it exports and from which of its modules; a name is imported on
first use::

    __getattr__, __all__ = lazy_exports(__name__, {".method": ("Dinomaly",), ".config": ("DinomalyConfig",)})

so ``import uad.data.index`` or reading ``uad/methods/<name>/declaration.py`` imports no torch.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, Mapping, Sequence

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: Mapping[str, Sequence[str]]) -> tuple[Callable[[str], Any], list[str]]:
    """``(__getattr__, __all__)`` for ``package``: ``exports`` maps a module (relative, ``.method``,
    or absolute) to the names it provides. A loaded name is kept in the package's namespace."""
    where = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__, sorted(where)
